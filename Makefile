# One command runs a real cell (make run), one passes the tests (make test). Both install what they
# need on a fresh Debian machine: runsc (Debian's package), busybox-static, nftables, iproute2,
# tmux, python3, staticcheck.

SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(HOME)/go/bin:$(PATH)
GO ?= go
BIN := $(CURDIR)/.cache/bin
STATICCHECK_VERSION := v0.8.2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FUZZTIME ?= 10s

.PHONY: run test test-current deps runsc runsc-current tools lint unit fuzz bench clean

run: runsc
	$(GO) run ./cmd/cellrun run testdata/cells/hello.json

test: deps lint
	CELLOS_REQUIRE_RUNSC=1 $(GO) test -race -count=1 -timeout 20m ./...
	$(MAKE) fuzz

# The same suite against a current runsc (see README, "runsc versions"), built once into the cache.
test-current: deps runsc-current
	CELLOS_REQUIRE_RUNSC=1 CELLOS_GVISOR_RUNSC_BIN=$(RUNSC_CURRENT) $(GO) test -race -count=1 -timeout 30m ./...

# Debian packages the tests need, installed only when missing.
deps: runsc tools
	@command -v busybox >/dev/null || { $(SUDO) apt-get install -y busybox-static || { $(SUDO) apt-get update && $(SUDO) apt-get install -y busybox-static; }; }
	@# nft and ip: cells with egress rules (nft) and the network tests' own test hosts (ip).
	@[ -x /usr/sbin/nft ] || command -v nft >/dev/null || { $(SUDO) apt-get install -y nftables || { $(SUDO) apt-get update && $(SUDO) apt-get install -y nftables; }; }
	@[ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || command -v ip >/dev/null || { $(SUDO) apt-get install -y iproute2 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y iproute2; }; }
	@# tmux: the terminal tests (cellrun pull's progress bar); python3: the images built from it.
	@command -v tmux >/dev/null || { $(SUDO) apt-get install -y tmux || { $(SUDO) apt-get update && $(SUDO) apt-get install -y tmux; }; }
	@[ -x /usr/bin/python3 ] || { $(SUDO) apt-get install -y python3 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y python3; }; }

runsc:
	@command -v runsc >/dev/null || { $(SUDO) apt-get install -y runsc || { $(SUDO) apt-get update && $(SUDO) apt-get install -y runsc; }; }
	@runsc --version | head -1

# A current runsc from the Go module proxy (about 1.5 minutes to build), kept in .cache/runsc-current
# and not rebuilt while present (unless built by this target for another version). CGO_ENABLED=0:
# a cgo build cannot start sandboxes. Such a build reports its version as VERSION_MISSING.
RUNSC_CURRENT_VERSION := v0.0.0-20260905035102-160fafc42237
RUNSC_CURRENT := $(CURDIR)/.cache/runsc-current/runsc

runsc-current:
	@if [ -x $(RUNSC_CURRENT) ] && { [ ! -e $(RUNSC_CURRENT).version ] || [ "$$(cat $(RUNSC_CURRENT).version)" = $(RUNSC_CURRENT_VERSION) ]; }; then \
		echo "runsc-current: $(RUNSC_CURRENT) is present"; \
	else \
		mkdir -p $(dir $(RUNSC_CURRENT)) && \
		CGO_ENABLED=0 GOBIN=$(dir $(RUNSC_CURRENT)) $(GO) install gvisor.dev/gvisor/runsc@$(RUNSC_CURRENT_VERSION) && \
		echo $(RUNSC_CURRENT_VERSION) > $(RUNSC_CURRENT).version; \
	fi

tools: $(BIN)/staticcheck

$(BIN)/staticcheck:
	GOBIN=$(BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

lint: tools
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(BIN)/staticcheck ./...

# A short fuzz pass over each fuzz target; the corpus lives in testdata/.
fuzz:
	$(GO) test ./cellos -run '^$$' -fuzz '^FuzzParseDocument$$' -fuzztime $(FUZZTIME)
	$(GO) test . -run '^$$' -fuzz '^FuzzBuildSpec$$' -fuzztime $(FUZZTIME)
	@# One worker: with two, the workers of this target stall (a few executions a second).
	$(GO) test ./internal/layer -run '^$$' -fuzz '^FuzzApply$$' -fuzztime $(FUZZTIME) -parallel 1

# Benchmarks, never part of `make test`: the document path (go test -bench) and the end-to-end
# comparison with raw runsc (bench/, its own module for the plotting dependencies), then the warm
# pool against cold starts on Debian's and the current runsc (pool.md). The results tables and
# charts land in bench/results/.
bench: runsc runsc-current
	$(GO) test -run '^$$' -bench . -benchmem . ./cellos ./internal/layer
	cd bench && $(GO) run . -out results
	cd bench && $(GO) run . -mode pool -runsc "$$(command -v runsc) $(RUNSC_CURRENT)" -out results

clean:
	rm -rf .cache
