package gvisor

import (
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// Environment variables consulted at every Create (and Destroy, WaitForExit, Recover); they beat
// the options, so tests and operators can point a running program at another runsc or root.
const (
	EnvRunscBin   = "CELLOS_GVISOR_RUNSC_BIN"
	EnvBundleRoot = "CELLOS_GVISOR_BUNDLE_ROOT"
)

// DefaultOutputCap bounds what is kept of each of a cell's output streams.
const DefaultOutputCap = 64 << 20

// DefaultMinFreeSpace is the free space Create requires on the bundle root's filesystem.
const DefaultMinFreeSpace = 64 << 20

// Option configures a Backend.
type Option func(*options) error

type options struct {
	runscPath  string
	bundleRoot string
	stateRoot  string
	platform   string
	runscFlags []string
	logger     *zap.Logger
	output     func(cellID string) (stdout, stderr io.Writer)
	outputCap  int64
	net        netOptions // WithCellNetwork, WithEgressUplink, WithHostStackNetworking (network.go)
	warmPool   int        // WithWarmPool (pool.go)
	noSpare    bool       // WithSpareShim(false) (spare.go)

	allowRoot    bool             // WithAllowRoot
	bindSources  []string         // WithBindSources; nil: any source outside the protected directories
	defaults     DefaultResources // WithDefaultResources
	defaultsSet  bool             // the operator chose the defaults (enforced or refused, never skipped)
	minFree      int64            // WithMinFreeSpace
	sharedSocket bool             // WithUnconfinedControlSockets

	imageStore  string      // WithImageStore (image.go)
	insecure    []string    // WithInsecureRegistries
	imageLimits ImageLimits // WithImageLimits
}

// WithRunscPath sets the runsc binary (default: "runsc" on $PATH). CELLOS_GVISOR_RUNSC_BIN
// overrides it.
func WithRunscPath(path string) Option {
	return func(o *options) error {
		if path == "" {
			return fmt.Errorf("WithRunscPath: empty path")
		}
		o.runscPath = path
		return nil
	}
}

// WithBundleRoot sets the directory that holds one bundle directory per cell (default
// ${TMPDIR:-/tmp}/cellos-gvisor). CELLOS_GVISOR_BUNDLE_ROOT overrides it.
func WithBundleRoot(dir string) Option {
	return func(o *options) error {
		if dir == "" {
			return fmt.Errorf("WithBundleRoot: empty path")
		}
		abs, err := filepath.Abs(dir) // once: a later chdir must not move the root
		if err != nil {
			return fmt.Errorf("WithBundleRoot: %w", err)
		}
		o.bundleRoot = abs
		return nil
	}
}

// WithStateRoot sets runsc's state directory (--root; default <bundle root>/.runsc). It must be
// private to this library: Recover treats every container in it as a cell of its own.
func WithStateRoot(dir string) Option {
	return func(o *options) error {
		if dir == "" {
			return fmt.Errorf("WithStateRoot: empty path")
		}
		abs, err := filepath.Abs(dir)
		if err != nil {
			return fmt.Errorf("WithStateRoot: %w", err)
		}
		o.stateRoot = abs
		return nil
	}
}

// WithLogger sets the logger (default: a no-op logger).
func WithLogger(l *zap.Logger) Option {
	return func(o *options) error {
		if l == nil {
			return fmt.Errorf("WithLogger: nil logger")
		}
		o.logger = l
		return nil
	}
}

// WithOutput asks for live copies of each cell's stdout and stderr, besides the files in its
// bundle. f is called once per cell at Create (and at Recover for adopted cells, which then get
// the output from its start); either writer may be nil. A writer that returns an error is dropped.
// WaitForExit returns only after the writers have received all the output.
func WithOutput(f func(cellID string) (stdout, stderr io.Writer)) Option {
	return func(o *options) error {
		o.output = f
		return nil
	}
}

// WithOutputCap bounds how many bytes of each output stream are kept (default 64 MiB). Beyond
// it the output is read and discarded, the file says so on its last line, the shim's log and the
// library's log record it.
func WithOutputCap(bytes int64) Option {
	return func(o *options) error {
		if bytes <= 0 {
			return fmt.Errorf("WithOutputCap: %d is not a positive size", bytes)
		}
		o.outputCap = bytes
		return nil
	}
}

// WithPlatform selects runsc's platform (ptrace, systrap, kvm). Unset, the library picks systrap
// where the runsc binary has it, else runsc's own default (ptrace); kvm is never chosen by the
// library (see Backend.Runtime). A platform the binary does not offer fails Create (ErrHost).
func WithPlatform(name string) Option {
	return func(o *options) error {
		if name == "" || strings.ContainsAny(name, " =\t\n") {
			return fmt.Errorf("WithPlatform: %q is not a platform name", name)
		}
		o.platform = name
		return nil
	}
}

// reservedFlags are the global runsc flags the library sets itself.
var reservedFlags = []string{"root", "log", "log-format", "network", "ignore-cgroups", "overlay2", "rootless", "platform"}

// WithRunscFlags adds global runsc flags (e.g. "--debug", "--debug-log=/var/log/runsc/") after the
// library's own. Flags the library sets itself are refused.
func WithRunscFlags(flags ...string) Option {
	return func(o *options) error {
		for _, f := range flags {
			if !strings.HasPrefix(f, "-") {
				return fmt.Errorf("WithRunscFlags: %q is not a flag (flags take the form --name or --name=value)", f)
			}
			name, _, _ := strings.Cut(strings.TrimLeft(f, "-"), "=")
			if name == "" {
				return fmt.Errorf("WithRunscFlags: %q has no flag name", f)
			}
			for _, r := range reservedFlags {
				if name == r {
					return fmt.Errorf("WithRunscFlags: --%s is set by the library", name)
				}
			}
		}
		o.runscFlags = append(o.runscFlags, flags...)
		return nil
	}
}

// WithSpareShim keeps one cell shim started ahead of the next Create (default true), which takes
// the start-up of the program's own binary off a cell's start: the shim is this binary,
// re-executed. The spare is a process of about 2 MiB (PSS) that exits with the program or at Close.
// A program that creates one cell and exits (a CLI) turns it off.
func WithSpareShim(enabled bool) Option {
	return func(o *options) error {
		o.noSpare = !enabled
		return nil
	}
}

// WithAllowRoot lets documents (and Exec) run their process as uid 0 or gid 0 inside the cell.
// Refused by default: a process that is root inside the sandbox owns every file of the cell's
// root and mounts that root owns, writable binds included.
func WithAllowRoot(allow bool) Option {
	return func(o *options) error {
		o.allowRoot = allow
		return nil
	}
}

// WithBindSources restricts the sources of bind mounts to the given directories and what is
// below them (after resolving symlinks). Without it any source is accepted except the protected
// ones: the bundle root, the runsc state root, /run/netns, /proc, /sys, /dev, whatever is inside
// them and whatever contains them (so "/" too). The protected directories stay refused whatever
// the prefixes.
func WithBindSources(prefixes ...string) Option {
	return func(o *options) error {
		if len(prefixes) == 0 {
			return fmt.Errorf("WithBindSources: no prefixes")
		}
		for _, p := range prefixes {
			if !filepath.IsAbs(p) || filepath.Clean(p) != p {
				return fmt.Errorf("WithBindSources: %q is not an absolute, clean path", p)
			}
		}
		o.bindSources = append(o.bindSources, prefixes...)
		return nil
	}
}

// DefaultResources are the limits a cell gets for what its document leaves unset: each field
// applies on its own (a document that sets only memoryBytes still gets the default CPU limit). A
// zero field sets no default.
type DefaultResources struct {
	MemoryBytes int64         // memory limit (at least 32 MiB)
	CPUMillis   int64         // CPU limit, 1000 = one core
	TTL         time.Duration // lifetime; rounded up to whole seconds
}

// DefaultLimits are the defaults without WithDefaultResources: 1 GiB of memory, one CPU, no
// lifetime limit.
var DefaultLimits = DefaultResources{MemoryBytes: 1 << 30, CPUMillis: 1000}

// WithDefaultResources sets the limits of cells whose documents declare none (see
// DefaultResources; default DefaultLimits). WithDefaultResources(DefaultResources{}) lets cells
// without limits run unbounded. Limits chosen here are enforced or refused like a document's:
// on a host without cgroups (not root), Create refuses cells they apply to. The library's own
// defaults are not applied where cgroups are unavailable (a warning is logged once, at New).
func WithDefaultResources(d DefaultResources) Option {
	return func(o *options) error {
		if d.MemoryBytes < 0 || d.CPUMillis < 0 || d.TTL < 0 {
			return fmt.Errorf("WithDefaultResources: negative limits %+v", d)
		}
		if d.MemoryBytes > 0 && d.MemoryBytes < cellos.MinMemoryBytes {
			return fmt.Errorf("WithDefaultResources: memory %d is below the minimum of %d bytes", d.MemoryBytes, cellos.MinMemoryBytes)
		}
		o.defaults, o.defaultsSet = d, true
		return nil
	}
}

// WithMinFreeSpace sets the free space Create requires on the bundle root's filesystem (default
// DefaultMinFreeSpace); below it Create fails with ErrHost. The floor keeps one cell's output
// from leaving no room for the rest of the root; each cell's exit record has its space reserved
// at Create besides.
func WithMinFreeSpace(bytes int64) Option {
	return func(o *options) error {
		if bytes < 0 {
			return fmt.Errorf("WithMinFreeSpace: %d is negative", bytes)
		}
		o.minFree = bytes
		return nil
	}
}

// WithUnconfinedControlSockets lets a Backend that does not run as root start cells with a runsc
// whose sandboxes serve their control RPC on abstract Unix sockets (Debian's 2022 runsc), which
// every local user of the host's network namespace can reach: exec into the cell, signal it. As
// root the library confines those sockets to a network namespace of each cell's own; without
// root it cannot, and refuses such cells unless the operator accepts the exposure with this
// option (a host where no other user runs processes).
func WithUnconfinedControlSockets(accept bool) Option {
	return func(o *options) error {
		o.sharedSocket = accept
		return nil
	}
}
