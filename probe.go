package gvisor

import (
	"context"
	"fmt"
	"sync"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	"go.uber.org/zap"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// RuntimeInfo is what the library found out about a runsc binary, and what it chose with it.
type RuntimeInfo = runsc.RuntimeInfo

// RuntimeFeatures are the capabilities that differ between runsc generations and change what
// the library does.
type RuntimeFeatures = runsc.RuntimeFeatures

// platformFlag is the --platform value cells run with: WithPlatform's, else the choice when it
// differs from runsc's own default ("" leaves the flag out).
func (b *Backend) platformFlag(info RuntimeInfo) string {
	if b.opts.platform != "" || info.Platform != info.DefaultPlatform {
		return info.Platform
	}
	return ""
}

// probeLog remembers the binaries a Backend has logged, so that it logs each once.
type probeLog struct {
	mu   sync.Mutex
	seen map[runsc.Key]bool
}

func (l *probeLog) first(k runsc.Key) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.seen == nil {
		l.seen = map[runsc.Key]bool{}
	}
	if l.seen[k] {
		return false
	}
	l.seen[k] = true
	return true
}

// Runtime probes the runsc binary that Create would use now (CELLOS_GVISOR_RUNSC_BIN, else
// WithRunscPath, else runsc on $PATH) — once per binary, cached — and returns what it is and
// what the library chose with it. A binary that cannot serve is an error wrapping ErrHost that
// names what is missing; Create fails the same way.
func (b *Backend) Runtime(ctx context.Context) (RuntimeInfo, error) {
	const op = "runtime"
	loc := b.locate()
	if loc.runscErr != nil {
		return RuntimeInfo{}, cellos.NewError(op, "", cellos.ErrHost, loc.runscErr)
	}
	return b.runtime(ctx, loc.runsc.Path, op, "")
}

// runtime probes (or takes from the cache) the binary at path and logs what it found the first
// time this Backend uses it.
func (b *Backend) runtime(ctx context.Context, path, op, cellID string) (RuntimeInfo, error) {
	p, key, ran, err := b.prober.Probe(ctx, path)
	if err != nil {
		return RuntimeInfo{}, cellos.NewError(op, cellID, cellos.ErrHost, err)
	}
	info, err := p.Info(b.opts.platform, b.root)
	if err != nil {
		return info, cellos.NewError(op, cellID, cellos.ErrHost, err)
	}
	if b.probed.first(key) {
		b.log.Info("runsc runtime", zap.String("path", info.Path), zap.String("version", info.Version),
			zap.String("spec", info.Spec), zap.Strings("platforms", info.Platforms),
			zap.String("defaultPlatform", info.DefaultPlatform), zap.String("platform", info.Platform),
			zap.Bool("overlay2", info.Features.Overlay2), zap.String("overlay2Default", info.Features.Overlay2Default),
			zap.Bool("pinnedNetNS", info.Features.PinnedNetNS),
			zap.Bool("probedNow", ran), zap.Duration("probeTook", info.ProbeTook))
	}
	return info, nil
}

// useRuntime probes the runsc of loc for Create and applies what it supports to loc: the
// platform, and whether --overlay2 may be passed. A document that needs what the binary lacks is
// refused with ErrUnsupported.
func (b *Backend) useRuntime(ctx context.Context, s *cellos.CellSpec, loc *location) error {
	info, err := b.runtime(ctx, loc.runsc.Path, "create", s.ID)
	if err != nil {
		return err
	}
	if s.Rootfs != nil && s.Rootfs.Writable && !info.Features.Overlay2 {
		return cellos.NewError("create", s.ID, cellos.ErrUnsupported, cellos.FieldError{Field: "spec.rootfs.writable",
			Reason: fmt.Sprintf("runsc %s (version %s) has no --overlay2 flag, which keeps a writable root's changes in memory", info.Path, info.Version)})
	}
	loc.runsc.Platform = b.platformFlag(info)
	loc.runsc.NoOverlay2 = !info.Features.Overlay2
	return nil
}
