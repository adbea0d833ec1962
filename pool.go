package gvisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/shim"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
	"github.com/cellos/cellos-host-gvisor/internal/ctlns"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
	"github.com/cellos/cellos-host-gvisor/internal/proc"
)

// Warm start. A cold cell waits for runsc to start a sandbox (78–110 ms here before its first
// instruction); `runsc exec` into a sandbox that is already running starts a process in 21–39 ms.
// With WithWarmPool(n) the Backend keeps n idle sandboxes started ahead of time for the documents
// whose sandbox does not depend on the document — no rootfs, mounts, resources or network, the
// "default profile" — and runs such a cell's process in one of them with `runsc exec`, as a full
// OCI process (the document's argv, env, working directory and user; no capabilities, no new
// privileges). Every other document takes the cold path, unchanged.
//
// A pool sandbox serves one cell and is deleted with it; the pool is refilled in the background,
// one sandbox at a time. A Create that finds no idle sandbox takes the cold path at once: it never
// waits for the pool.
//
// On disk, an idle sandbox is <bundle root>/.pool/<24 hex digits>: a bundle whose process is the
// idle init (sleep, as WarmPoolIdleUID), run by runsc under the id cellos-pool-<the same digits>.
// ".pool" is not a cell id, and no runsc id of a cell is a prefix of a pool id or the reverse
// ("cellos-" + hex digits against "cellos-pool-"). Its shim — the "keeper", pool_keeper.go —
// started it and waits. To hand it to a cell, the library writes the cell's files into that
// directory (config.json, shim.json, the user's /etc/passwd and /etc/group), renames it to
// <bundle root>/<cell id> (exclusively) and tells the keeper, which from then on is the cell's
// shim: it runs `runsc exec`, captures the output into the bundle's files, enforces the TTL,
// deletes the sandbox after the workload and writes exit.json. To the supervisor the cell is like
// any other: same handle, output, exit statuses, TTL, Destroy, crash survival and Recover.
//
// What differs inside the cell (README, "Warm pool"): the hostname is WarmPoolHostname, not the
// cell id (the sandbox exists before the cell has an id); and the workload is not pid 1 of its
// pid namespace: the idle init is, running as another uid (WarmPoolIdleUID) so that the workload
// cannot signal it. A document asking for that uid takes the cold path.

const (
	// WarmPoolIdleUID is the uid and gid of a pool sandbox's idle init. A cell's workload runs as
	// another user, so that it cannot kill the init (and with it its own sandbox); documents whose
	// user is this uid take the cold path.
	WarmPoolIdleUID = 2147483646
	// WarmPoolHostname is the hostname of cells started from the warm pool: their sandbox is
	// started before the cell id is known, and the hostname of a running sandbox is fixed.
	WarmPoolHostname = "cell"
	// AnnotationWarmPool names a pool sandbox in the config.json it was started with
	// (sandbox.json in a pooled cell's bundle).
	AnnotationWarmPool = "cellos.dev/warm-pool"
	// MaxWarmPool bounds WithWarmPool's size.
	MaxWarmPool = 256
)

// poolDirName is <bundle root>/.pool/<name>: the idle sandboxes.
const poolDirName = ".pool"

// Bounds of the pool's waits.
const (
	poolStartTimeout   = 90 * time.Second // a keeper starting its sandbox, on a loaded host
	poolClaimTimeout   = 15 * time.Second // a keeper starting runsc exec for its cell
	keeperStopTimeout  = 20 * time.Second // a keeper deleting its idle sandbox
	poolMaxBackoff     = 30 * time.Second
	poolSettle         = time.Second // the longest a refill waits for the cell that emptied the slot to end
	poolInitialBackoff = 250 * time.Millisecond
)

// poolIdleArgv is the idle init: it does nothing until the sandbox is deleted.
var poolIdleArgv = []string{"/bin/sleep", "infinity"}

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

// PoolStats describes the warm pool of a Backend.
type PoolStats struct {
	Size     int  // WithWarmPool's size; 0 without a pool
	Idle     int  // started sandboxes waiting for a cell
	Starting bool // a sandbox is being started
	Closed   bool // Close was called
	// Pooled counts cells created in a pool sandbox; Cold the Creates of the pool's profile that
	// found no idle sandbox and took the cold path; Failed the pool sandboxes that failed to
	// start, died idle or could not be handed to a cell.
	Pooled, Cold, Failed uint64
}

// PoolStats reports the state of the warm pool (all zero without WithWarmPool).
func (b *Backend) PoolStats() PoolStats {
	p := b.pool
	if p == nil {
		return PoolStats{}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.stats
	st.Size, st.Idle, st.Starting, st.Closed = p.size, len(p.idle), p.starting, p.closed
	return st
}

// warmPool keeps the idle sandboxes of one Backend.
type warmPool struct {
	b    *Backend
	size int

	mu       sync.Mutex
	idle     []*warmEntry           // oldest first
	owned    map[string]bool        // names of entries this pool made that are not yet a cell's or removed (Recover skips them)
	dirs     map[string]bool        // the pool directories it has used (one per bundle root)
	roots    map[string]runsc.Runsc // the runsc state roots it has used
	starting bool
	closed   bool
	// lastClaim is the bundle of the cell that took the last sandbox, and when.
	lastClaim   string
	lastClaimAt time.Time
	stats       PoolStats // the counters
	closeErr    error
	closing     chan struct{} // closed when Close has finished

	wake   chan struct{} // asks the filler to look again
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the filler has stopped
}

// warmEntry is one pool sandbox and its keeper.
type warmEntry struct {
	name, dir, runscID string
	key                string      // the runsc and bundle root it was made for (warmKey)
	runsc              runsc.Runsc // with the entry's control namespace
	flags              runsc.CellFlags
	limits             cgroups.Limits // its cgroups' (the Backend's default limits); zero: none

	d      *owned.Dir    // the entry's directory
	keeper *shim.Proc    // nil until started
	exited chan struct{} // closed once the keeper has exited and been reaped
}

func newWarmPool(b *Backend, size int) *warmPool {
	if size <= 0 {
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &warmPool{b: b, size: size, owned: map[string]bool{}, dirs: map[string]bool{}, roots: map[string]runsc.Runsc{}, wake: make(chan struct{}, 1),
		ctx: ctx, cancel: cancel, done: make(chan struct{})}
	go p.run()
	return p
}

// warmKey identifies what a pool sandbox was started with: a cell may use it only when its own
// Create resolved the same runsc, flags and bundle root.
func warmKey(root string, r *runsc.Runsc) string {
	return strings.Join([]string{root, r.Path, r.Root, r.Platform, strconv.FormatBool(r.Rootless),
		strconv.FormatBool(r.NoOverlay2), strings.Join(r.Extra, "\x01")}, "\x00")
}

// warmProfile reports whether a document's sandbox is the pool's: nothing of it depends on the
// document, and its limits (defaults applied) are the pool sandboxes' own. The workload's user
// must not be the idle init's.
func warmProfile(s *cellos.CellSpec, limits cgroups.Limits) bool {
	var r cellos.ResourceSpec
	if s.Resources != nil {
		r = *s.Resources
	}
	return s.Rootfs == nil && len(s.Mounts) == 0 &&
		r.MemoryBytes == limits.MemoryBytes && r.CPUMillis == limits.CPUMillis &&
		(s.Network == nil || len(s.Network.Egress) == 0) &&
		s.Run.EffectiveUser().UID != WarmPoolIdleUID
}

// limits are the pool sandboxes' cgroup limits: the Backend's default limits, so that a cell in
// a pool sandbox is bounded as a cold cell without declared limits is.
func (p *warmPool) limits() cgroups.Limits {
	d := p.b.opts.defaults
	return cgroups.Limits{MemoryBytes: d.MemoryBytes, CPUMillis: d.CPUMillis}
}

// idleDocument is the document a pool sandbox is started from. HOME is set so that runsc does not
// look the idle user up in /etc/passwd when the sandbox starts: the file does not exist yet (the
// cell's is written at claim time), and gVisor would remember that it does not.
func idleDocument(limits cgroups.Limits) *cellos.ExecutionCellDocument {
	d := &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind, Spec: cellos.CellSpec{
		ID: WarmPoolHostname,
		Run: cellos.RunSpec{Argv: slices.Clone(poolIdleArgv), Env: map[string]string{"HOME": "/"},
			User: &cellos.UserSpec{UID: WarmPoolIdleUID, GID: WarmPoolIdleUID}},
	}}
	if limits.MemoryBytes > 0 || limits.CPUMillis > 0 {
		d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: limits.MemoryBytes, CPUMillis: limits.CPUMillis}
	}
	return d
}

func (p *warmPool) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

func (p *warmPool) wants() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.closed && len(p.idle) < p.size
}

// run is the filler: it starts one sandbox at a time while the pool is short, so that refilling
// never takes more than one core's worth of sandbox start from concurrent Creates.
func (p *warmPool) run() {
	defer close(p.done)
	var backoff time.Duration
	for p.ctx.Err() == nil {
		if !p.wants() {
			select {
			case <-p.ctx.Done():
			case <-p.wake:
			}
			continue
		}
		p.settle()
		p.setStarting(true)
		e, err := p.fill(p.ctx)
		p.setStarting(false)
		if err != nil {
			if p.ctx.Err() != nil {
				return
			}
			p.count(&p.stats.Failed)
			backoff = min(max(2*backoff, poolInitialBackoff), poolMaxBackoff)
			p.b.log.Warn("warm pool: starting an idle sandbox failed", zap.Error(err), zap.Duration("retryIn", backoff))
			select {
			case <-p.ctx.Done():
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		if !p.add(e) {
			_ = p.discard(e) // closed meanwhile
		}
	}
}

// settle waits, within poolSettle, until the cell that took the last sandbox has exited: starting
// the replacement sandbox while that cell's workload starts would compete with it for the CPU (on
// two cores a sandbox start alongside added ~10 ms to a trivial cell's first byte). A cell that
// runs longer gets its replacement after poolSettle.
func (p *warmPool) settle() {
	p.mu.Lock()
	last, at := p.lastClaim, p.lastClaimAt
	p.mu.Unlock()
	for deadline := at.Add(poolSettle); last != "" && time.Now().Before(deadline); {
		if exists(filepath.Join(last, bundle.Exit)) || !exists(last) { // a hint only: nothing is done with either
			return // it ended, or is gone
		}
		select {
		case <-p.ctx.Done():
			return
		case <-time.After(2 * time.Millisecond):
		}
	}
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func (p *warmPool) setStarting(v bool) {
	p.mu.Lock()
	p.starting = v
	p.mu.Unlock()
}

func (p *warmPool) count(n *uint64) {
	p.mu.Lock()
	*n++
	p.mu.Unlock()
}

func (p *warmPool) add(e *warmEntry) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.idle = append(p.idle, e)
	return true
}

// take removes and returns the oldest idle sandbox made for key, or nil. Without one, idle
// sandboxes made for another key (the runsc or the bundle root changed) are retired, so that the
// filler makes ones that fit.
func (p *warmPool) take(key string) *warmEntry {
	p.mu.Lock()
	stale := false
	for i, e := range p.idle {
		if e.key != key {
			stale = true
			continue
		}
		select {
		case <-e.exited:
			continue // dying: keeperExited removes it
		default:
		}
		p.idle = slices.Delete(p.idle, i, i+1)
		p.mu.Unlock()
		return e
	}
	p.mu.Unlock()
	if stale {
		p.retire(key)
	}
	return nil
}

func (p *warmPool) own(e *warmEntry) {
	p.mu.Lock()
	p.owned[e.name] = true
	p.dirs[filepath.Dir(e.dir)] = true
	p.roots[e.runsc.Root] = e.runsc
	p.mu.Unlock()
}

func (p *warmPool) disown(name string) {
	p.mu.Lock()
	delete(p.owned, name)
	p.mu.Unlock()
}

// owns reports whether the entry name is this pool's (nil-safe).
func (p *warmPool) owns(name string) bool {
	if p == nil {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.owned[name]
}

// active reports whether the pool may still make entries (nil-safe).
func (p *warmPool) active() bool {
	if p == nil {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.closed
}

// retire discards the idle sandboxes not made for key: the runsc or the bundle root changed.
func (p *warmPool) retire(key string) {
	p.mu.Lock()
	var stale []*warmEntry
	p.idle = slices.DeleteFunc(p.idle, func(e *warmEntry) bool {
		if e.key != key {
			stale = append(stale, e)
			return true
		}
		return false
	})
	p.mu.Unlock()
	for _, e := range stale {
		go func() {
			if err := p.discard(e); err != nil {
				p.b.log.Warn("warm pool: removing an idle sandbox", zap.String("sandbox", e.runscID), zap.Error(err))
			}
		}()
	}
}

// keeperExited runs when an entry's keeper has exited. While idle, that means its sandbox died.
func (p *warmPool) keeperExited(e *warmEntry) {
	p.mu.Lock()
	i := slices.Index(p.idle, e)
	if i >= 0 {
		p.idle = slices.Delete(p.idle, i, i+1)
		p.stats.Failed++
	}
	p.mu.Unlock()
	if i < 0 {
		return
	}
	p.b.log.Warn("warm pool: an idle sandbox ended", zap.String("sandbox", e.runscID), zap.String("log", bundle.Tail(e.d, bundle.ShimLog)))
	if err := p.discard(e); err != nil {
		p.b.log.Warn("warm pool: removing an idle sandbox", zap.String("sandbox", e.runscID), zap.Error(err))
	}
	p.poke()
}

// fill starts one pool sandbox with the runsc and bundle root a Create would use now.
func (p *warmPool) fill(ctx context.Context) (*warmEntry, error) {
	b := p.b
	loc := b.locate()
	if loc.runscErr != nil {
		return nil, loc.runscErr
	}
	limits := p.limits()
	idle := idleDocument(limits)
	if err := b.useRuntime(ctx, &idle.Spec, &loc); err != nil {
		return nil, err
	}
	if err := b.checkControlSockets(ctx, "", loc); err != nil {
		return nil, err
	}
	key := warmKey(loc.root, loc.runsc)
	p.retire(key)
	root, err := openRoots(loc)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	if err := b.checkFreeSpace(loc.root); err != nil {
		return nil, err
	}
	pdir, err := openPoolDir(root, true)
	if err != nil {
		return nil, err
	}
	defer pdir.Close()
	e, err := p.newEntry(loc, pdir, key, limits)
	if err != nil {
		return nil, fmt.Errorf("making an idle sandbox's directory: %w", err)
	}
	if err := p.prepare(e, idle); err != nil {
		return nil, errors.Join(fmt.Errorf("preparing an idle sandbox: %w", err), p.discard(e))
	}
	if err := p.startKeeper(ctx, e); err != nil {
		return nil, errors.Join(err, p.discard(e))
	}
	return e, nil
}

// openPoolDir opens the bundle root's pool directory under the ownership rule, making it when
// create is set; nil without error when it does not exist and create is not set.
func openPoolDir(root *owned.Dir, create bool) (*owned.Dir, error) {
	d, err := root.OpenDir(poolDirName)
	if errors.Is(err, fs.ErrNotExist) {
		if !create {
			return nil, nil
		}
		d, err = root.Mkdir(poolDirName, 0o700)
		if errors.Is(err, fs.ErrExist) {
			d, err = root.OpenDir(poolDirName)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("pool directory: %w", err)
	}
	return d, nil
}

// newEntry makes a pool entry's directory, named after its own device and inode (poolName): it is
// made under a temporary name and renamed, so every entry of the pool directory with a valid name
// is one the library made.
func (p *warmPool) newEntry(loc location, pdir *owned.Dir, key string, limits cgroups.Limits) (*warmEntry, error) {
	tmp, err := pdir.MkdirTemp("new-", 0o700)
	if err != nil {
		return nil, err
	}
	dev, ino := tmp.Ident()
	tmpName := filepath.Base(tmp.Path())
	_ = tmp.Close()
	name := runsc.PoolName(loc.root, dev, ino)
	if err := pdir.Rename(tmpName, pdir, name); err != nil {
		_ = pdir.RemoveAll(tmpName)
		return nil, err
	}
	d, err := owned.OpenIdent(filepath.Join(pdir.Path(), name), dev, ino)
	if err != nil {
		_ = pdir.RemoveAll(name)
		return nil, err
	}
	e := &warmEntry{name: name, dir: d.Path(), d: d, runscID: runsc.PoolIDPrefix + name, key: key, runsc: *loc.runsc,
		limits: limits, exited: make(chan struct{})}
	if p.b.root {
		e.runsc.NetNS = filepath.Join(e.dir, bundle.ControlNetns)
	}
	e.flags = runsc.CellFlags{Log: filepath.Join(e.dir, bundle.SandboxLog), IgnoreCgroups: limits == (cgroups.Limits{}), Overlay: "none"}
	if loc.runsc.NoOverlay2 {
		e.flags.Overlay = ""
	}
	p.own(e) // Recover leaves it alone
	return e, nil
}

// prepare writes an idle sandbox's bundle: the root (the host's system symlinks and the parts of
// /etc that do not depend on the cell), config.json, the empty files the cell will use, its
// cgroups and its control namespace.
func (p *warmPool) prepare(e *warmEntry, idle *cellos.ExecutionCellDocument) error {
	rootfs, err := e.d.Mkdir(bundle.Rootfs, 0o755)
	if err != nil {
		return err
	}
	defer rootfs.Close()
	if err := bundle.WriteHostLinks(rootfs, p.b.host); err != nil {
		return err
	}
	etc, err := rootfs.Mkdir("etc", 0o755)
	if err != nil {
		return err
	}
	defer etc.Close()
	// passwd and group name the cell's user: they are written when a cell claims the sandbox, as
	// new files the sandbox has never looked up.
	files := bundle.EtcFiles(&idle.Spec)
	for _, name := range []string{"hosts", "hostname", "resolv.conf"} {
		if err := etc.WriteFile(name, []byte(files[name]), 0o644); err != nil {
			return err
		}
	}
	in := SpecInputs{HostSystem: p.b.host}
	if e.limits != (cgroups.Limits{}) {
		in.CgroupsPath = cgroups.Path(e.runscID)
	}
	spec := BuildSpec(idle, in)
	spec.Annotations = map[string]string{AnnotationWarmPool: e.name}
	data, err := MarshalSpec(spec)
	if err != nil {
		return err
	}
	if err := e.d.WriteFile(bundle.Config, data, 0o644); err != nil {
		return err
	}
	if err := bundle.WriteFiles(e.d); err != nil {
		return err
	}
	if err := e.d.WriteFile(bundle.SandboxLog, nil, 0o640); err != nil {
		return err
	}
	if e.limits != (cgroups.Limits{}) {
		if err := p.b.cg.Create(e.runscID, e.limits); err != nil {
			return fmt.Errorf("cgroups: %w", err)
		}
	}
	if e.runsc.NetNS != "" {
		if err := ctlns.Create(e.runsc.NetNS); err != nil {
			return fmt.Errorf("the sandbox's control network namespace: %w", err)
		}
	}
	return nil
}

// startKeeper starts the entry's keeper and waits until its sandbox runs.
func (p *warmPool) startKeeper(ctx context.Context, e *warmEntry) error {
	k, err := shim.Start(shim.KeeperArgv0)
	if err != nil {
		close(e.exited)
		return fmt.Errorf("starting a pool keeper: %w", err)
	}
	e.keeper = k
	go func() {
		<-k.Exited
		close(e.exited)
		p.keeperExited(e)
	}()
	dev, ino := e.d.Ident()
	r := e.runsc
	if r.NetNS != "" {
		r.NetNS = bundle.ControlNetns // the keeper works in its directory, wherever it is moved
	}
	req := shim.KeeperRequest{Protocol: shim.Protocol, Dir: e.dir, Dev: dev, Ino: ino, RunscID: e.runscID, Runsc: r, Flags: e.flags}
	if err := k.Send(req); err != nil {
		return fmt.Errorf("starting a pool keeper: %w", err)
	}
	line, err := e.reply(ctx, poolStartTimeout)
	if err != nil {
		return fmt.Errorf("waiting for an idle sandbox to start: %w; keeper log: %s", err, bundle.Tail(e.d, bundle.ShimLog))
	}
	if line != "ok" {
		return fmt.Errorf("%s", strings.TrimPrefix(line, "error: "))
	}
	return nil
}

// reply reads the keeper's next answer, within ctx and timeout.
func (e *warmEntry) reply(ctx context.Context, timeout time.Duration) (string, error) {
	line, err := e.keeper.Answer(ctx, timeout)
	if errors.Is(err, shim.ErrNoAnswer) {
		return "", errors.New("the pool keeper exited without an answer")
	}
	return line, err
}

// discard removes an entry that is not a cell's: its keeper deletes its sandbox when its request
// pipe closes; a keeper that does not is killed and the sandbox force-deleted. Then its cgroups
// and, once runsc holds nothing of it, the directory go.
func (p *warmPool) discard(e *warmEntry) error {
	var errs []error
	if k := e.keeper; k != nil {
		_ = k.Requests.Close()
		select {
		case <-e.exited:
		case <-time.After(keeperStopTimeout):
			_ = k.Cmd.Process.Kill() // through its pidfd: never another process
			select {
			case <-e.exited:
			case <-time.After(shimExitGrace):
				errs = append(errs, fmt.Errorf("the pool keeper (pid %d) did not exit", k.Cmd.Process.Pid))
			}
		}
		_ = k.Answers.Close()
	}
	if err := removeSandbox(&e.runsc, e.runscID); err != nil {
		errs = append(errs, err)
	}
	if e.limits != (cgroups.Limits{}) && p.b.cg != nil {
		if _, err := p.b.cg.Remove(e.runscID, cgroupRmTimout); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		if err := removeEntry(e.d); err != nil {
			errs = append(errs, err)
		}
	}
	_ = e.d.Close()
	p.disown(e.name) // what is left is Recover's
	return errors.Join(errs...)
}

// removeEntry removes a pool entry's directory, wherever it is now (d is open on it).
func removeEntry(d *owned.Dir) error {
	parent, err := owned.Open(filepath.Dir(d.Path()))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	defer parent.Close()
	if err := d.Verify(); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	return bundle.Remove(parent, filepath.Base(d.Path()))
}

// removeSandbox force-deletes a pool sandbox runsc still holds state of.
func removeSandbox(r *runsc.Runsc, id string) error {
	files := r.StateFiles(id)
	if len(files) == 0 {
		return nil
	}
	locksOnly := !slices.ContainsFunc(files, func(f string) bool { return !strings.HasSuffix(f, ".lock") })
	if r.NetNS != "" && !exists(r.NetNS) {
		cp := *r // its control namespace was never made: no sandbox of it can run
		cp.NetNS = ""
		r = &cp
	}
	var errs []error
	if r.Path != "" && !locksOnly { // lone locks: nothing for runsc to delete
		ctx, cancel := context.WithTimeout(context.Background(), runscTimeout)
		if err := r.Delete(ctx, id); err != nil {
			errs = append(errs, err)
		}
		cancel()
	}
	if left := r.RemoveStaleLocks(id); len(left) > 0 {
		errs = append(errs, fmt.Errorf("runsc state left: %s", strings.Join(left, ", ")))
	}
	return errors.Join(errs...)
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
	p := b.pool
	if p == nil {
		return nil
	}
	p.mu.Lock()
	if p.closed {
		closing := p.closing
		p.mu.Unlock()
		select {
		case <-closing:
			return p.closeErr
		case <-ctx.Done():
			return cellos.NewError("close", "", cellos.ErrHost, ctx.Err())
		}
	}
	p.closed = true
	p.closing = make(chan struct{})
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	start := time.Now()
	p.cancel()
	errs := make([]error, len(idle))
	var wg sync.WaitGroup
	for _, e := range idle {
		_ = e.keeper.Requests.Close() // every keeper deletes its sandbox at once
	}
	for i, e := range idle {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = p.discard(e)
		}()
	}
	finished := make(chan struct{})
	go func() {
		wg.Wait()
		<-p.done // the filler discards what it was starting
		close(finished)
	}()
	var err error
	select {
	case <-finished:
		err = errors.Join(errs...)
		p.mu.Lock()
		for dir := range p.dirs {
			_ = os.Remove(dir) // .pool, unless something else is in it
		}
		roots := slices.Collect(maps.Values(p.roots))
		p.mu.Unlock()
		for _, r := range roots {
			b.releaseStateRoot(&r) // current runsc's pinned null-netns, when no container is left
		}
	case <-ctx.Done():
		err = fmt.Errorf("%w; idle sandboxes may remain (their removal goes on in the background; Recover removes what is left)", ctx.Err())
	}
	if err != nil {
		err = cellos.NewError("close", "", cellos.ErrHost, err)
	}
	p.closeErr = err
	close(p.closing)
	b.log.Info("warm pool closed", zap.Int("idleDeleted", len(idle)), zap.Duration("took", time.Since(start)), zap.Error(err))
	return err
}

// awaitBackground waits, within ctx, for the goroutines the Backend started for itself (probes).
func (b *Backend) awaitBackground(ctx context.Context) error {
	done := make(chan struct{})
	go func() { b.wg.Wait(); b.prober.Wait(); close(done) }()
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
	if p == nil || image != "" || c.net != nil || !warmProfile(s, p.limits()) {
		return false, nil
	}
	// What the cold path refuses, it reports: no pool sandbox is spent on it.
	if len(c.runsc.StateFiles(RunscID(c.paths.root, s.ID))) > 0 {
		return false, nil
	}
	if _, err := os.Lstat(c.paths.bundle); err == nil {
		return false, nil
	}
	e := p.take(warmKey(c.paths.root, c.runsc))
	if e == nil {
		p.count(&p.stats.Cold)
		p.poke()
		return false, nil
	}
	defer p.poke()
	cold, err := b.claim(ctx, c, doc, e)
	switch {
	case err == nil:
		p.mu.Lock()
		p.stats.Pooled++
		p.lastClaim, p.lastClaimAt = c.paths.bundle, time.Now()
		p.mu.Unlock()
		return true, nil
	case cold && ctx.Err() == nil:
		p.count(&p.stats.Failed)
		b.log.Warn("warm pool: a sandbox could not take the cell; cold start instead", zap.String("cell", s.ID), zap.Error(err))
		return false, nil
	default:
		return true, err
	}
}

// claim hands the idle sandbox e to the cell c. cold is true when the failure is the pool's and
// nothing of the cell is left: the cold path may still create it.
func (b *Backend) claim(ctx context.Context, c *cell, doc *cellos.ExecutionCellDocument, e *warmEntry) (cold bool, err error) {
	p, s, bpath := b.pool, &doc.Spec, c.paths.bundle
	fail := func(kind error, format string, args ...any) error {
		return cellos.Errorf("create", s.ID, kind, format, args...)
	}
	root, err := openRoots(location{root: c.paths.root, runsc: c.runsc})
	if err != nil {
		go p.discardLogged(e)
		return true, fail(cellos.ErrHost, "%w", err)
	}
	defer root.Close()
	pdir, err := openPoolDir(root, false)
	if err == nil && pdir == nil {
		err = errors.New("the pool directory is gone")
	}
	if err != nil {
		go p.discardLogged(e)
		return true, fail(cellos.ErrHost, "%w", err)
	}
	defer pdir.Close()
	cfg := shim.Config{CellID: s.ID, RunscID: e.runscID, Runsc: *c.runsc,
		Flags:      runsc.CellFlags{Log: filepath.Join(bpath, bundle.RunscLog), IgnoreCgroups: e.flags.IgnoreCgroups, Overlay: e.flags.Overlay},
		TTLSeconds: s.TTLSeconds(), OutputCap: b.opts.outputCap, Pool: true}
	cfg.Runsc.NetNS = "" // set below, once the directory is the bundle
	if e.limits != (cgroups.Limits{}) {
		cfg.MemoryCgroup = b.cg.MemoryDir(e.runscID)
	}
	if err := b.writePooledCell(e, doc, cfg); err != nil {
		go p.discardLogged(e)
		return true, fail(cellos.ErrHost, "writing the cell into a pool sandbox: %w", err)
	}
	if err := pdir.Rename(e.name, root, s.ID); err != nil {
		go p.discardLogged(e)
		if errors.Is(err, fs.ErrExist) {
			return false, fail(cellos.ErrAlreadyExists, "%s exists; Destroy or Recover removes it", bpath)
		}
		return true, fail(cellos.ErrHost, "moving a pool sandbox to the bundle: %w", err)
	}
	p.disown(e.name) // the directory is the cell's bundle now
	dev, ino := e.d.Ident()
	c.dir, err = owned.OpenIdent(bpath, dev, ino)
	if err != nil {
		// Someone moved it meanwhile: it is not the cell's, and nothing is sent to the keeper.
		return false, fail(cellos.ErrHost, "the bundle after the move: %w", err)
	}
	c.paths.runscID, c.pid = e.runscID, e.keeper.Ident
	if e.runsc.NetNS != "" {
		c.runsc.NetNS = filepath.Join(bpath, bundle.ControlNetns)
		cfg.Runsc.NetNS = c.runsc.NetNS
	}
	if e.limits != (cgroups.Limits{}) {
		cgPath := cgroups.Path(e.runscID)
		c.handle.CgroupPath, c.memory = &cgPath, cfg.MemoryCgroup
	}
	err = e.keeper.Send(shim.Request{Protocol: shim.Protocol, Bundle: bpath, Dev: dev, Ino: ino, Config: cfg})
	_ = e.keeper.Requests.Close()
	line := ""
	if err == nil {
		line, err = e.reply(ctx, poolClaimTimeout)
	}
	_ = e.keeper.Answers.Close()
	if err == nil && line != "ok" {
		err = errors.New(strings.TrimPrefix(line, "error: "))
	}
	if err != nil {
		err = fail(cellos.ErrHost, "starting the cell in a pool sandbox: %w", err)
		_ = e.keeper.Cmd.Process.Kill()
		select {
		case <-e.exited:
		case <-time.After(shimExitGrace):
		}
		if uerr := b.undoCreate(c, root, e.limits != (cgroups.Limits{})); uerr != nil {
			b.log.Error("cleaning up after a failed create", zap.String("cell", s.ID), zap.Error(uerr))
			return false, err
		}
		_ = c.dir.Close()
		c.dir, c.handle.CgroupPath, c.memory = nil, nil, ""
		c.paths.runscID, c.pid = RunscID(c.paths.root, s.ID), pidRecord{}
		c.runsc.NetNS = filepath.Join(bpath, bundle.ControlNetns)
		return true, err
	}
	_ = e.d.Close()
	c.handle.CellID = s.ID
	b.startWatching(c)
	return false, nil
}

func (p *warmPool) discardLogged(e *warmEntry) {
	if err := p.discard(e); err != nil {
		p.b.log.Warn("warm pool: removing a sandbox", zap.String("sandbox", e.runscID), zap.Error(err))
	}
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
func (b *Backend) writePooledCell(e *warmEntry, doc *cellos.ExecutionCellDocument, cfg shim.Config) error {
	s := &doc.Spec
	files := bundle.EtcFiles(s)
	rootfs, err := e.d.OpenDir(bundle.Rootfs)
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
	if e.limits != (cgroups.Limits{}) {
		in.CgroupsPath = cgroups.Path(e.runscID)
	}
	spec := BuildSpec(doc, in)
	spec.Hostname = WarmPoolHostname
	data, err := MarshalSpec(spec)
	if err != nil {
		return err
	}
	if err := e.d.Rename(bundle.Config, e.d, bundle.SandboxSpec); err != nil {
		return err
	}
	if err := e.d.WriteFile(bundle.Config, data, 0o644); err != nil {
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
	if err := e.d.WriteFile(bundle.Process, data, 0o644); err != nil {
		return err
	}
	if err := bundle.WriteMarker(e.d, s.ID); err != nil {
		return err
	}
	return bundle.WriteRecord(e.d, bundle.ShimConfig, cfg) // for operators; never read back
}

// signalCell sends sig to the cell's workload: the container's init for a cold cell, the
// workload's process for a pooled one (the init of its sandbox is the idle process).
func (b *Backend) signalCell(ctx context.Context, c *cell, sig syscall.Signal) error {
	if !runsc.IsPoolID(c.paths.runscID) {
		return c.runsc.Kill(ctx, c.paths.runscID, strconv.Itoa(int(sig)))
	}
	pidFile := filepath.Join(c.paths.bundle, bundle.WorkloadPid)
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		data, err := os.ReadFile(pidFile)
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

// recoverPool removes the pool sandboxes of loc's bundle root that this Backend does not own: the
// idle ones a dead supervisor left (its keepers delete them themselves once they see it gone;
// Recover finishes the job) — and those of another live Backend on the same root, which Recover,
// run once at supervisor start, treats the same. It also removes runsc state of pool sandboxes
// that have neither a pool directory nor a cell. Pool sandboxes never appear in the report. An
// entry of the pool directory the library did not make (its name is not its own poolName) is
// skipped with a warning.
func (b *Backend) recoverPool(ctx context.Context, loc location, root *owned.Dir, shims map[proc.FileIdent]proc.Ident) error {
	pdir, err := openPoolDir(root, false)
	if err != nil {
		return err
	}
	var errs []error
	if pdir != nil {
		defer pdir.Close()
		names, err := pdir.Entries()
		if err != nil {
			return err
		}
		errs = make([]error, len(names))
		var wg sync.WaitGroup
		for i, name := range names {
			if b.pool.owns(name) || ctx.Err() != nil {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = b.removePoolEntry(loc, pdir, name, shims)
			}()
		}
		wg.Wait()
	}
	if loc.runscErr == nil {
		if err := b.removeOrphanPoolState(loc, root, pdir); err != nil {
			errs = append(errs, err)
		}
	}
	if pdir != nil && !b.pool.active() {
		_ = root.Remove(poolDirName) // when empty
	}
	return errors.Join(errs...)
}

// removePoolEntry removes one idle sandbox of another (dead) supervisor: its keeper is asked to
// delete it (SIGTERM) and killed if it does not; then runsc's state, its cgroups and the
// directory go.
func (b *Backend) removePoolEntry(loc location, pdir *owned.Dir, name string, shims map[proc.FileIdent]proc.Ident) error {
	path := filepath.Join(pdir.Path(), name)
	d, err := pdir.OpenDir(name)
	if err != nil {
		b.log.Warn("skipping an entry of the pool directory that is not the library's", zap.String("path", path), zap.Error(err))
		return nil
	}
	defer d.Close()
	dev, ino := d.Ident()
	if name != runsc.PoolName(loc.root, dev, ino) {
		if strings.HasPrefix(name, "new-") {
			// An entry whose making was interrupted before its rename: nothing ran in it.
			return bundle.Remove(pdir, name)
		}
		b.log.Warn("skipping an entry of the pool directory that is not the library's", zap.String("path", path))
		return nil
	}
	if id, ok := shims[proc.FileIdent{Dev: dev, Ino: ino}]; ok {
		if h, err := shim.Open(id, d); err == nil {
			_ = h.Signal(unix.SIGTERM) // an idle keeper deletes its sandbox and exits
			if !waitFor(h, keeperStopTimeout) {
				_ = h.Signal(unix.SIGKILL)
				waitFor(h, shimExitGrace)
			}
			_ = h.Close()
		}
	}
	r := *loc.runsc
	r.NetNS = ""
	if _, err := d.Lstat(bundle.ControlNetns); err == nil && b.root {
		r.NetNS = filepath.Join(path, bundle.ControlNetns)
	}
	runscID := runsc.PoolIDPrefix + name
	var errs []error
	if err := removeSandbox(&r, runscID); err != nil {
		errs = append(errs, err)
	}
	if b.cg != nil {
		if _, err := b.cg.Remove(runscID, cgroupRmTimout); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		if err := bundle.Remove(pdir, name); err != nil {
			errs = append(errs, err)
		}
	}
	b.log.Info("removed an idle pool sandbox", zap.String("sandbox", runscID), zap.Error(errors.Join(errs...)))
	if len(errs) > 0 {
		return fmt.Errorf("pool sandbox %s: %w", path, errors.Join(errs...))
	}
	return nil
}

// removeOrphanPoolState removes runsc containers with a pool id that no pool directory and no
// cell's bundle accounts for: a pool sandbox whose directory went while runsc kept it.
func (b *Backend) removeOrphanPoolState(loc location, root, pdir *owned.Dir) error {
	ids, _ := loc.runsc.StateIDs()
	inUse := map[string]bool{}
	names, _ := root.Entries()
	for _, name := range names {
		if !cellos.ValidID(name) {
			continue
		}
		if d, err := root.OpenDir(name); err == nil {
			if _, err := d.Lstat(bundle.SandboxSpec); err == nil {
				dev, ino := d.Ident()
				inUse[runsc.PoolID(loc.root, dev, ino)] = true
			}
			_ = d.Close()
		}
	}
	var errs []error
	for id := range ids {
		if !runsc.IsPoolID(id) || inUse[id] {
			continue
		}
		name := strings.TrimPrefix(id, runsc.PoolIDPrefix)
		if b.pool.owns(name) {
			continue
		}
		if pdir != nil {
			if _, err := pdir.Lstat(name); err == nil {
				continue // its directory is there: removePoolEntry reported why it stayed
			}
		}
		r := *loc.runsc
		r.NetNS = ""
		if err := removeSandbox(&r, id); err != nil {
			errs = append(errs, err)
		}
		if b.cg != nil {
			if _, err := b.cg.Remove(id, cgroupRmTimout); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
