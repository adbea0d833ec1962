package gvisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/bundle"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
	"github.com/cellos/cellos-host-gvisor/internal/pool"
	"github.com/cellos/cellos-host-gvisor/internal/runsc"
	"github.com/cellos/cellos-host-gvisor/internal/shim"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
)

// Warm start. A cold cell waits for runsc to start a sandbox (78–110 ms here before its first
// instruction); `runsc exec` into a sandbox that is already running starts a process in 21–39 ms.
// With WithWarmPool(n) the Backend keeps n idle sandboxes started ahead of time (internal/pool)
// for the documents whose sandbox does not depend on the document — no rootfs, mounts or egress
// rules, the default limits — and runs such a cell's process in one of them with `runsc exec`, as
// a full OCI process (the document's argv, env, working directory and user; no capabilities, no
// new privileges). Every other document takes the cold path, unchanged. This file hands an idle
// sandbox to a cell: it writes the cell's files into the sandbox's directory (config.json, the
// process, the user's /etc/passwd and /etc/group, the marker), renames it to <bundle
// root>/<cell id> (exclusively) and sends the keeper the cell's request; the keeper is the cell's
// shim from then on. To the supervisor the cell is like any other.
//
// What differs inside the cell (README, "Warm pool"): the hostname is WarmPoolHostname, not the
// cell id (the sandbox exists before the cell has an id); and the workload is not pid 1 of its
// pid namespace: the idle init is, running as another uid (WarmPoolIdleUID) so that the workload
// cannot signal it. A document asking for that uid takes the cold path.

// Names of the warm pool.
const (
	// WarmPoolIdleUID is the uid and gid of a pool sandbox's idle init. A cell's workload runs as
	// another user, so that it cannot kill the init (and with it its own sandbox); documents whose
	// user is this uid take the cold path.
	WarmPoolIdleUID = pool.IdleUID
	// WarmPoolHostname is the hostname of cells started from the warm pool: their sandbox is
	// started before the cell id is known, and the hostname of a running sandbox is fixed.
	WarmPoolHostname = pool.Hostname
	// AnnotationWarmPool names a pool sandbox in the config.json it was started with
	// (sandbox.json in a pooled cell's bundle).
	AnnotationWarmPool = pool.Annotation
	// MaxWarmPool bounds WithWarmPool's size.
	MaxWarmPool = 256
)

// WithWarmPool keeps size sandboxes started ahead of time for documents of the default profile
// (no rootfs, mounts, resources or network), so that such a cell's first instruction runs about
// as soon as `runsc exec` can start it. 0 (the default) disables the pool. The pool starts
// filling when New returns, in the background; each sandbox serves one cell and is replaced after
// it. Close deletes the idle sandboxes. See README, "Warm pool", for what it costs and what
// differs inside a pooled cell (its hostname, and an idle init as pid 1).
func WithWarmPool(size int) Option {
	return func(o *options) error {
		if size < 0 || size > MaxWarmPool {
			return fmt.Errorf("WithWarmPool: %d is not a pool size (0 to %d)", size, MaxWarmPool)
		}
		o.warmPool = size
		return nil
	}
}

// PoolStats describes the warm pool of a Backend: its size, idle and starting sandboxes, and
// counters of pooled and cold Creates and of sandboxes that failed.
type PoolStats = pool.Stats

// PoolStats reports the state of the warm pool (all zero without WithWarmPool).
func (b *Backend) PoolStats() PoolStats { return b.pool.Stats() }

// poolEnv is what the warm pool needs of its Backend: where and how a sandbox is made now, with
// every check a Create makes.
type poolEnv struct{ b *Backend }

func (pe poolEnv) Place(ctx context.Context, idle *cellos.ExecutionCellDocument) (pool.Place, error) {
	b := pe.b
	loc := b.locate()
	if loc.runscErr != nil {
		return pool.Place{}, loc.runscErr
	}
	if err := b.useRuntime(ctx, &idle.Spec, &loc); err != nil {
		return pool.Place{}, err
	}
	if err := b.checkControlSockets(ctx, "", loc); err != nil {
		return pool.Place{}, err
	}
	root, err := openRoots(loc)
	if err != nil {
		return pool.Place{}, err
	}
	if err := b.checkFreeSpace(loc.root); err != nil {
		_ = root.Close()
		return pool.Place{}, err
	}
	return pool.Place{Root: root, Runsc: *loc.runsc, Confine: b.root}, nil
}

// Close releases what the Backend keeps ahead of time: the spare shim ends, and the warm pool
// stops: no sandbox is started any more, and every idle one is deleted with its directory. Cells
// are not touched — those started from the pool included: they are cells like any other, outlive
// the Backend by design, and are ended by Destroy (or a later Recover). The Backend remains
// usable; later Creates take the cold path and start their shims themselves. ctx bounds the wait
// for the idle sandboxes to go; what is left then is named in the error (ErrHost), and Recover
// removes it. Close is idempotent and safe for concurrent use.
func (b *Backend) Close(ctx context.Context) error {
	b.spares.Close()
	if err := b.awaitBackground(ctx); err != nil {
		return err
	}
	if err := b.pool.Close(ctx); err != nil {
		return cellos.NewError("close", "", cellos.ErrHost, err)
	}
	if err := b.closeImages(); err != nil {
		return cellos.NewError("close", "", cellos.ErrHost, err)
	}
	return nil
}

// awaitBackground waits, within ctx, for the goroutines the Backend started for itself: its probes.
func (b *Backend) awaitBackground(ctx context.Context) error {
	done := make(chan struct{})
	go func() { b.prober.Wait(); b.ctl.Wait(); b.netProbes.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return cellos.NewError("close", "", cellos.ErrHost, fmt.Errorf("waiting for the Backend's probes: %w", ctx.Err()))
	}
}

// createFromPool creates c in a pool sandbox when doc fits the pool and one is idle. pooled is
// false when the cell is to take the cold path (nothing of it exists then).
func (b *Backend) createFromPool(ctx context.Context, c *cell, doc *cellos.ExecutionCellDocument, image string) (pooled bool, err error) {
	p := b.pool
	s := &doc.Spec
	if p == nil || image != "" || c.net != nil || !pool.Fits(s, p.Limits()) {
		return false, nil
	}
	// What the cold path refuses, it reports: no pool sandbox is spent on it.
	if len(c.runsc.StateFiles(RunscID(c.paths.root, s.ID))) > 0 {
		return false, nil
	}
	if _, err := os.Lstat(c.paths.bundle); err == nil {
		return false, nil
	}
	e := p.Take(pool.Key(c.paths.root, c.runsc))
	if e == nil {
		p.CountCold()
		p.Poke()
		return false, nil
	}
	defer p.Poke()
	cold, err := b.claim(ctx, c, doc, e)
	switch {
	case err == nil:
		p.Claimed(c.paths.bundle)
		return true, nil
	case cold && ctx.Err() == nil:
		p.CountFailed()
		b.log.Warn("warm pool: a sandbox could not take the cell; cold start instead", zap.String("cell", s.ID), zap.Error(err))
		return false, nil
	default:
		return true, err
	}
}

// claim hands the idle sandbox e to the cell c. cold is true when the failure is the pool's and
// nothing of the cell is left: the cold path may still create it.
func (b *Backend) claim(ctx context.Context, c *cell, doc *cellos.ExecutionCellDocument, e *pool.Entry) (cold bool, err error) {
	p, s, bpath := b.pool, &doc.Spec, c.paths.bundle
	fail := func(kind error, format string, args ...any) error {
		return cellos.Errorf("create", s.ID, kind, format, args...)
	}
	root, err := openRoots(location{root: c.paths.root, runsc: c.runsc})
	if err != nil {
		go p.DiscardLogged(e)
		return true, fail(cellos.ErrHost, "%w", err)
	}
	defer root.Close()
	pdir, err := pool.OpenDir(root, false)
	if err == nil && pdir == nil {
		err = errors.New("the pool directory is gone")
	}
	if err != nil {
		go p.DiscardLogged(e)
		return true, fail(cellos.ErrHost, "%w", err)
	}
	defer pdir.Close()
	cfg := shim.Config{CellID: s.ID, RunscID: e.RunscID, Runsc: *c.runsc,
		Flags:      runsc.CellFlags{Log: filepath.Join(bpath, bundle.RunscLog), IgnoreCgroups: e.Flags.IgnoreCgroups, Overlay: e.Flags.Overlay},
		TTLSeconds: s.TTLSeconds(), OutputCap: b.opts.outputCap, Pool: true}
	cfg.Runsc.NetNS = "" // set below, once the directory is the bundle
	if e.Limits != (cgroups.Limits{}) {
		cfg.MemoryCgroup = b.cg.MemoryDir(e.RunscID)
	}
	if err := b.writePooledCell(e, doc, cfg); err != nil {
		go p.DiscardLogged(e)
		return true, fail(cellos.ErrHost, "writing the cell into a pool sandbox: %w", err)
	}
	if err := pdir.Rename(e.Name, root, s.ID); err != nil {
		go p.DiscardLogged(e)
		if errors.Is(err, fs.ErrExist) {
			return false, fail(cellos.ErrAlreadyExists, "%s exists; Destroy or Recover removes it", bpath)
		}
		return true, fail(cellos.ErrHost, "moving a pool sandbox to the bundle: %w", err)
	}
	p.Disown(e.Name) // the directory is the cell's bundle now
	dev, ino := e.Dir.Ident()
	c.dir, err = owned.OpenIdent(bpath, dev, ino)
	if err != nil {
		// Someone moved it meanwhile: it is not the cell's, and nothing is sent to the keeper.
		return false, fail(cellos.ErrHost, "the bundle after the move: %w", err)
	}
	c.paths.runscID, c.pid = e.RunscID, e.Keeper.Ident
	if e.Runsc.NetNS != "" {
		c.runsc.NetNS = filepath.Join(bpath, bundle.ControlNetns)
		cfg.Runsc.NetNS = c.runsc.NetNS
	}
	if e.Limits != (cgroups.Limits{}) {
		cgPath := cgroups.Path(e.RunscID)
		c.handle.CgroupPath, c.memory = &cgPath, cfg.MemoryCgroup
	}
	err = e.Keeper.Send(shim.Request{Protocol: shim.Protocol, Bundle: bpath, Dev: dev, Ino: ino, Config: cfg})
	_ = e.Keeper.Requests.Close()
	line := ""
	if err == nil {
		line, err = e.Reply(ctx, pool.ClaimTimeout)
	}
	_ = e.Keeper.Answers.Close()
	if err == nil && line != "ok" {
		err = errors.New(strings.TrimPrefix(line, "error: "))
	}
	if err != nil {
		err = fail(cellos.ErrHost, "starting the cell in a pool sandbox: %w", err)
		_ = e.Keeper.Cmd.Process.Kill()
		select {
		case <-e.Exited:
		case <-time.After(shimExitGrace):
		}
		if uerr := b.undoCreate(c, root, e.Limits != (cgroups.Limits{})); uerr != nil {
			b.log.Error("cleaning up after a failed create", zap.String("cell", s.ID), zap.Error(uerr))
			return false, err
		}
		_ = c.dir.Close()
		c.dir, c.handle.CgroupPath, c.memory = nil, nil, ""
		c.paths.runscID, c.pid = RunscID(c.paths.root, s.ID), pidRecord{}
		c.runsc.NetNS = filepath.Join(bpath, bundle.ControlNetns)
		return true, err
	}
	_ = e.Dir.Close()
	c.handle.CellID = s.ID
	b.startWatching(c)
	return false, nil
}

// execProcessFile is the workload's process for `runsc exec --process`: every field set,
// the capability sets explicitly empty.
type execProcessFile struct {
	User            specs.User       `json:"user"`
	Args            []string         `json:"args"`
	Env             []string         `json:"env"`
	Cwd             string           `json:"cwd"`
	Capabilities    execCapabilities `json:"capabilities"`
	NoNewPrivileges bool             `json:"noNewPrivileges"`
}

type execCapabilities struct {
	Bounding    []string `json:"bounding"`
	Effective   []string `json:"effective"`
	Inheritable []string `json:"inheritable"`
	Permitted   []string `json:"permitted"`
	Ambient     []string `json:"ambient"`
}

// writePooledCell writes the cell's files into the pool directory, before it becomes the bundle:
// /etc/passwd and /etc/group naming the cell's user, config.json (the cell's own; the sandbox's
// is kept as sandbox.json), the workload's process, the marker and the shim record.
func (b *Backend) writePooledCell(e *pool.Entry, doc *cellos.ExecutionCellDocument, cfg shim.Config) error {
	s := &doc.Spec
	files := bundle.EtcFiles(s)
	rootfs, err := e.Dir.OpenDir(bundle.Rootfs)
	if err != nil {
		return err
	}
	defer rootfs.Close()
	etc, err := rootfs.OpenDir("etc")
	if err != nil {
		return err
	}
	defer etc.Close()
	for _, name := range []string{"passwd", "group"} {
		if err := etc.WriteFile(name, []byte(files[name]), 0o644); err != nil {
			return err
		}
	}
	in := SpecInputs{HostSystem: b.host}
	if e.Limits != (cgroups.Limits{}) {
		in.CgroupsPath = cgroups.Path(e.RunscID)
	}
	spec := BuildSpec(doc, in)
	spec.Hostname = pool.Hostname
	data, err := MarshalSpec(spec)
	if err != nil {
		return err
	}
	if err := e.Dir.Rename(bundle.Config, e.Dir, bundle.SandboxSpec); err != nil {
		return err
	}
	if err := e.Dir.WriteFile(bundle.Config, data, 0o644); err != nil {
		return err
	}
	empty := []string{}
	pr := spec.Process
	data, err = json.Marshal(execProcessFile{User: pr.User, Args: pr.Args, Env: pr.Env, Cwd: pr.Cwd,
		Capabilities:    execCapabilities{Bounding: empty, Effective: empty, Inheritable: empty, Permitted: empty, Ambient: empty},
		NoNewPrivileges: true})
	if err != nil {
		return err
	}
	if err := e.Dir.WriteFile(bundle.Process, data, 0o644); err != nil {
		return err
	}
	if err := bundle.WriteMarker(e.Dir, s.ID); err != nil {
		return err
	}
	return bundle.WriteRecord(e.Dir, bundle.ShimConfig, cfg) // for operators; never read back
}

// signalCell sends sig to the cell's workload: the container's init for a cold cell, the
// workload's process for a pooled one (the init of its sandbox is the idle process).
func (b *Backend) signalCell(ctx context.Context, c *cell, sig syscall.Signal) error {
	if !runsc.IsPoolID(c.paths.runscID) {
		return c.runsc.Kill(ctx, c.paths.runscID, strconv.Itoa(int(sig)))
	}
	// A pid inside the sandbox, written by runsc: it can only name a process of this sandbox.
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		data, err := c.dir.ReadFile(bundle.WorkloadPid, 64)
		if pid, perr := strconv.Atoi(strings.TrimSpace(string(data))); err == nil && perr == nil && pid > 0 {
			return c.runsc.KillProcess(ctx, c.paths.runscID, pid, strconv.Itoa(int(sig)))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the workload's pid: %w", ctx.Err())
		case <-c.exited:
			return errors.New("the workload has exited")
		case <-time.After(delay):
		}
	}
}

// isPooled reports whether c runs in a pool sandbox.
func (c *cell) isPooled() bool { return runsc.IsPoolID(c.paths.runscID) }
