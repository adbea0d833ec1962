// Package pool keeps a Backend's warm pool: sandboxes started ahead of time, idle, for the
// documents whose sandbox does not depend on the document (no rootfs, mounts, egress rules; the
// default limits). It makes them (one at a time, in the background), hands one out (Take), and
// deletes them (Discard, Close, and RemoveLeftovers for those a dead supervisor left). Handing a
// sandbox to a cell — writing the cell's files into it and moving it to the cell's bundle — is
// the Backend's (pooled.go): a claimed entry is a cell like any other.
//
// On disk, an idle sandbox is <bundle root>/.pool/<24 hex digits>, named after its directory's
// device and inode (runsc.PoolName): a bundle whose process is the idle init (sleep, as IdleUID),
// run by runsc under the id cellos-pool-<the same digits>. Its keeper (internal/shim) started it
// and waits for the cell that claims it.
package pool

import (
	"context"
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
	"time"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/bundle"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
	"github.com/cellos/cellos-host-gvisor/internal/ctlns"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
	"github.com/cellos/cellos-host-gvisor/internal/proc"
	"github.com/cellos/cellos-host-gvisor/internal/runsc"
	"github.com/cellos/cellos-host-gvisor/internal/shim"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Env is what the pool needs of its Backend to make a sandbox now.
type Env interface {
	// Place returns where and how a sandbox for the idle document is made now: the bundle root
	// (open, owned, with room; the caller closes it) and the runsc (probed, its control sockets
	// checked), or why not.
	Place(ctx context.Context, idle *cellos.ExecutionCellDocument) (Place, error)
}

// Place is where sandboxes are made.
type Place struct {
	Root    *owned.Dir
	Runsc   runsc.Runsc
	Confine bool // give each sandbox a control network namespace (runsc.Runsc.NetNS)
}

// Config is a pool's fixed configuration.
type Config struct {
	Size    int
	Limits  cgroups.Limits // the sandboxes' cgroups; zero: none
	Host    []bundle.HostEntry
	Cgroups *cgroups.Manager
	Log     *zap.Logger
}

// Leftovers is what RemoveLeftovers needs to remove a dead supervisor's idle sandboxes.
type Leftovers struct {
	Root    *owned.Dir
	Runsc   runsc.Runsc // Path "" when runsc cannot be used: only what needs no runsc is removed
	Confine bool
	Cgroups *cgroups.Manager
	Log     *zap.Logger
	Shims   map[proc.FileIdent]proc.Ident // the keepers alive (shim.FindAll)
}

// Bounds of the pool's waits.
const (
	StartTimeout        = 90 * time.Second // a keeper starting its sandbox, on a loaded host
	ClaimTimeout        = 15 * time.Second // a keeper starting runsc exec for its cell
	keeperStopTimeout   = 20 * time.Second // a keeper deleting its idle sandbox
	maxBackoff          = 30 * time.Second
	settleMax           = time.Second // the longest a refill waits for the cell that emptied the slot to end
	initialBackoff      = 250 * time.Millisecond
	exitGrace           = 10 * time.Second
	cgroupRemoveTimeout = 5 * time.Second
	runscTimeout        = 15 * time.Second
)

// DirName is the bundle root's directory of idle sandboxes: not a cell id.
const DirName = ".pool"

// Identity of the idle init and of a pooled cell.
const (
	// IdleUID is the uid and gid of a pool sandbox's idle init. A cell's workload runs as
	// another user, so that it cannot kill the init (and with it its own sandbox).
	IdleUID = 2147483646
	// Hostname is the hostname of cells started from the pool: their sandbox is started before
	// the cell id is known, and the hostname of a running sandbox is fixed.
	Hostname = "cell"
	// Annotation names a pool sandbox in the config.json it was started with.
	Annotation = "cellos.dev/warm-pool"
)

// idleArgv is the idle init: it does nothing until the sandbox is deleted.
var idleArgv = []string{"/bin/sleep", "infinity"}

// Stats are the pool's state and counters.
type Stats struct {
	Size     int  // the pool's size; 0 without a pool
	Idle     int  // started sandboxes waiting for a cell
	Starting bool // a sandbox is being started
	Closed   bool // Close was called
	// Pooled counts cells created in a pool sandbox; Cold the Creates of the pool's profile that
	// found no idle sandbox and took the cold path; Failed the pool sandboxes that failed to
	// start, died idle or could not be handed to a cell.
	Pooled, Cold, Failed uint64
}

// New starts a pool of cfg.Size sandboxes (nil for size 0); it fills in the background.
func New(env Env, cfg Config) *Pool {
	if cfg.Size <= 0 {
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pool{env: env, log: cfg.Log, size: cfg.Size, limits: cfg.Limits, host: cfg.Host, cg: cfg.Cgroups,
		owned: map[string]bool{}, dirs: map[string]bool{}, roots: map[string]runsc.Runsc{}, wake: make(chan struct{}, 1),
		ctx: ctx, cancel: cancel, done: make(chan struct{})}
	go p.run()
	return p
}

// Stats reports the pool's state (all zero for a nil pool).
func (p *Pool) Stats() Stats {
	if p == nil {
		return Stats{}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.stats
	st.Size, st.Idle, st.Starting, st.Closed = p.size, len(p.idle), p.starting, p.closed
	return st
}

// Claimed records a successful claim: the cell's bundle (the refill waits for it to end first).
func (p *Pool) Claimed(bundlePath string) {
	p.mu.Lock()
	p.stats.Pooled++
	p.lastClaim, p.lastClaimAt = bundlePath, time.Now()
	p.mu.Unlock()
}

// CountCold and CountFailed count a Create that found no idle sandbox, and a sandbox that could
// not be handed to its cell.
func (p *Pool) CountCold()   { p.count(&p.stats.Cold) }
func (p *Pool) CountFailed() { p.count(&p.stats.Failed) }

// DiscardLogged discards e and logs what it could not remove.
func (p *Pool) DiscardLogged(e *Entry) {
	if err := p.Discard(e); err != nil {
		p.log.Warn("warm pool: removing a sandbox", zap.String("sandbox", e.RunscID), zap.Error(err))
	}
}

// waitFor reports whether the process exits within d.
func waitFor(h *proc.Handle, d time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return h.Wait(ctx) == nil
}

// Pool keeps a Backend's idle sandboxes. It is safe for concurrent use.
type Pool struct {
	env    Env
	log    *zap.Logger
	size   int
	limits cgroups.Limits
	host   []bundle.HostEntry
	cg     *cgroups.Manager

	mu       sync.Mutex
	idle     []*Entry               // oldest first
	owned    map[string]bool        // names of entries this pool made that are not yet a cell's or removed (Recover skips them)
	dirs     map[string]bool        // the pool directories it has used (one per bundle root)
	roots    map[string]runsc.Runsc // the runsc state roots it has used
	starting bool
	closed   bool
	// lastClaim is the bundle of the cell that took the last sandbox, and when.
	lastClaim   string
	lastClaimAt time.Time
	stats       Stats // the counters
	closeErr    error
	closing     chan struct{} // closed when Close has finished

	wake   chan struct{} // asks the filler to look again
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the filler has stopped
}

// Entry is one pool sandbox and its keeper.
type Entry struct {
	Name    string          // its directory's name in the pool directory
	Path    string          // its directory, where it was made
	RunscID string          // its sandbox's runsc id
	Runsc   runsc.Runsc     // with the entry's control namespace
	Flags   runsc.CellFlags // its sandbox's global flags
	Limits  cgroups.Limits  // its cgroups' (the Backend's default limits); zero: none
	Dir     *owned.Dir      // the entry's directory, open
	Keeper  *shim.Proc      // nil until started
	Exited  chan struct{}   // closed once the keeper has exited and been reaped

	key string // the runsc and bundle root it was made for (Key)
}

// Key identifies what a pool sandbox was started with: a cell may use it only when its own
// Create resolved the same runsc, flags and bundle root.
func Key(root string, r *runsc.Runsc) string {
	return strings.Join([]string{root, r.Path, r.Root, r.Platform, strconv.FormatBool(r.Rootless),
		strconv.FormatBool(r.NoOverlay2), strings.Join(r.Extra, "\x01")}, "\x00")
}

// Fits reports whether a document's sandbox is the pool's: nothing of it depends on the
// document, and its limits (defaults applied) are the pool sandboxes' own. The workload's user
// must not be the idle init's.
func Fits(s *cellos.CellSpec, limits cgroups.Limits) bool {
	var r cellos.ResourceSpec
	if s.Resources != nil {
		r = *s.Resources
	}
	return s.Rootfs == nil && len(s.Mounts) == 0 &&
		r.MemoryBytes == limits.MemoryBytes && r.CPUMillis == limits.CPUMillis &&
		(s.Network == nil || len(s.Network.Egress) == 0) &&
		s.Run.EffectiveUser().UID != IdleUID
}

// Limits are the pool sandboxes' cgroup limits: the Backend's default limits, so that a cell in
// a pool sandbox is bounded as a cold cell without declared limits is.
func (p *Pool) Limits() cgroups.Limits {
	if p == nil {
		return cgroups.Limits{}
	}
	return p.limits
}

// IdleDocument is the document a pool sandbox is started from. HOME is set so that runsc does not
// look the idle user up in /etc/passwd when the sandbox starts: the file does not exist yet (the
// cell's is written at claim time), and gVisor would remember that it does not.
func IdleDocument(limits cgroups.Limits) *cellos.ExecutionCellDocument {
	d := &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind, Spec: cellos.CellSpec{
		ID: Hostname,
		Run: cellos.RunSpec{Argv: slices.Clone(idleArgv), Env: map[string]string{"HOME": "/"},
			User: &cellos.UserSpec{UID: IdleUID, GID: IdleUID}},
	}}
	if limits.MemoryBytes > 0 || limits.CPUMillis > 0 {
		d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: limits.MemoryBytes, CPUMillis: limits.CPUMillis}
	}
	return d
}

func (p *Pool) Poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

func (p *Pool) wants() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.closed && len(p.idle) < p.size
}

// run is the filler: it starts one sandbox at a time while the pool is short, so that refilling
// never takes more than one core's worth of sandbox start from concurrent Creates.
func (p *Pool) run() {
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
			backoff = min(max(2*backoff, initialBackoff), maxBackoff)
			p.log.Warn("warm pool: starting an idle sandbox failed", zap.Error(err), zap.Duration("retryIn", backoff))
			select {
			case <-p.ctx.Done():
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		if !p.add(e) {
			_ = p.Discard(e) // closed meanwhile
		}
	}
}

// settle waits, within settleMax, until the cell that took the last sandbox has exited: starting
// the replacement sandbox while that cell's workload starts would compete with it for the CPU (on
// two cores a sandbox start alongside added ~10 ms to a trivial cell's first byte). A cell that
// runs longer gets its replacement after settleMax.
func (p *Pool) settle() {
	p.mu.Lock()
	last, at := p.lastClaim, p.lastClaimAt
	p.mu.Unlock()
	for deadline := at.Add(settleMax); last != "" && time.Now().Before(deadline); {
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

func (p *Pool) setStarting(v bool) {
	p.mu.Lock()
	p.starting = v
	p.mu.Unlock()
}

func (p *Pool) count(n *uint64) {
	p.mu.Lock()
	*n++
	p.mu.Unlock()
}

func (p *Pool) add(e *Entry) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.idle = append(p.idle, e)
	return true
}

// Take removes and returns the oldest idle sandbox made for key, or nil. Without one, idle
// sandboxes made for another key (the runsc or the bundle root changed) are retired, so that the
// filler makes ones that fit.
func (p *Pool) Take(key string) *Entry {
	p.mu.Lock()
	stale := false
	for i, e := range p.idle {
		if e.key != key {
			stale = true
			continue
		}
		select {
		case <-e.Exited:
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

func (p *Pool) own(e *Entry) {
	p.mu.Lock()
	p.owned[e.Name] = true
	p.dirs[filepath.Dir(e.Path)] = true
	p.roots[e.Runsc.Root] = e.Runsc
	p.mu.Unlock()
}

func (p *Pool) Disown(name string) {
	p.mu.Lock()
	delete(p.owned, name)
	p.mu.Unlock()
}

// Owns reports whether the entry name is this pool's (nil-safe).
func (p *Pool) Owns(name string) bool {
	if p == nil {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.owned[name]
}

// Active reports whether the pool may still make entries (nil-safe).
func (p *Pool) Active() bool {
	if p == nil {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.closed
}

// retire discards the idle sandboxes not made for key: the runsc or the bundle root changed.
func (p *Pool) retire(key string) {
	p.mu.Lock()
	var stale []*Entry
	p.idle = slices.DeleteFunc(p.idle, func(e *Entry) bool {
		if e.key != key {
			stale = append(stale, e)
			return true
		}
		return false
	})
	p.mu.Unlock()
	for _, e := range stale {
		go func() {
			if err := p.Discard(e); err != nil {
				p.log.Warn("warm pool: removing an idle sandbox", zap.String("sandbox", e.RunscID), zap.Error(err))
			}
		}()
	}
}

// keeperExited runs when an entry's keeper has exited. While idle, that means its sandbox died.
func (p *Pool) keeperExited(e *Entry) {
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
	p.log.Warn("warm pool: an idle sandbox ended", zap.String("sandbox", e.RunscID), zap.String("log", bundle.Tail(e.Dir, bundle.ShimLog)))
	if err := p.Discard(e); err != nil {
		p.log.Warn("warm pool: removing an idle sandbox", zap.String("sandbox", e.RunscID), zap.Error(err))
	}
	p.Poke()
}

// fill starts one pool sandbox with the runsc and bundle root a Create would use now.
func (p *Pool) fill(ctx context.Context) (*Entry, error) {
	idle := IdleDocument(p.limits)
	pl, err := p.env.Place(ctx, idle)
	if err != nil {
		return nil, err
	}
	defer pl.Root.Close()
	key := Key(pl.Root.Path(), &pl.Runsc)
	p.retire(key)
	pdir, err := OpenDir(pl.Root, true)
	if err != nil {
		return nil, err
	}
	defer pdir.Close()
	e, err := p.newEntry(pl, pdir, key)
	if err != nil {
		return nil, fmt.Errorf("making an idle sandbox's directory: %w", err)
	}
	if err := p.prepare(e, idle); err != nil {
		return nil, errors.Join(fmt.Errorf("preparing an idle sandbox: %w", err), p.Discard(e))
	}
	if err := p.startKeeper(ctx, e); err != nil {
		return nil, errors.Join(err, p.Discard(e))
	}
	return e, nil
}

// OpenDir opens the bundle root's pool directory under the ownership rule, making it when
// create is set; nil without error when it does not exist and create is not set.
func OpenDir(root *owned.Dir, create bool) (*owned.Dir, error) {
	d, err := root.OpenDir(DirName)
	if errors.Is(err, fs.ErrNotExist) {
		if !create {
			return nil, nil
		}
		d, err = root.Mkdir(DirName, 0o700)
		if errors.Is(err, fs.ErrExist) {
			d, err = root.OpenDir(DirName)
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
func (p *Pool) newEntry(pl Place, pdir *owned.Dir, key string) (*Entry, error) {
	tmp, err := pdir.MkdirTemp("new-", 0o700)
	if err != nil {
		return nil, err
	}
	dev, ino := tmp.Ident()
	tmpName := filepath.Base(tmp.Path())
	_ = tmp.Close()
	name := runsc.PoolName(pl.Root.Path(), dev, ino)
	if err := pdir.Rename(tmpName, pdir, name); err != nil {
		_ = pdir.RemoveAll(tmpName)
		return nil, err
	}
	d, err := owned.OpenIdent(filepath.Join(pdir.Path(), name), dev, ino)
	if err != nil {
		_ = pdir.RemoveAll(name)
		return nil, err
	}
	limits := p.limits
	e := &Entry{Name: name, Path: d.Path(), Dir: d, RunscID: runsc.PoolIDPrefix + name, key: key, Runsc: pl.Runsc,
		Limits: limits, Exited: make(chan struct{})}
	if pl.Confine {
		e.Runsc.NetNS = filepath.Join(e.Path, bundle.ControlNetns)
	}
	e.Flags = runsc.CellFlags{Log: filepath.Join(e.Path, bundle.SandboxLog), IgnoreCgroups: limits == (cgroups.Limits{}), Overlay: "none"}
	if pl.Runsc.NoOverlay2 {
		e.Flags.Overlay = ""
	}
	p.own(e) // Recover leaves it alone
	return e, nil
}

// prepare writes an idle sandbox's bundle: the root (the host's system symlinks and the parts of
// /etc that do not depend on the cell), config.json, the empty files the cell will use, its
// cgroups and its control namespace.
func (p *Pool) prepare(e *Entry, idle *cellos.ExecutionCellDocument) error {
	rootfs, err := e.Dir.Mkdir(bundle.Rootfs, 0o755)
	if err != nil {
		return err
	}
	defer rootfs.Close()
	if err := bundle.WriteHostLinks(rootfs, p.host); err != nil {
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
	in := bundle.SpecInputs{HostSystem: p.host}
	if e.Limits != (cgroups.Limits{}) {
		in.CgroupsPath = cgroups.Path(e.RunscID)
	}
	spec := bundle.BuildSpec(idle, in)
	spec.Annotations = map[string]string{Annotation: e.Name}
	data, err := bundle.MarshalSpec(spec)
	if err != nil {
		return err
	}
	if err := e.Dir.WriteFile(bundle.Config, data, 0o644); err != nil {
		return err
	}
	if err := bundle.WriteFiles(e.Dir); err != nil {
		return err
	}
	if err := e.Dir.WriteFile(bundle.SandboxLog, nil, 0o640); err != nil {
		return err
	}
	if e.Limits != (cgroups.Limits{}) {
		if err := p.cg.Create(e.RunscID, e.Limits); err != nil {
			return fmt.Errorf("cgroups: %w", err)
		}
	}
	if e.Runsc.NetNS != "" {
		if err := ctlns.Create(e.Runsc.NetNS); err != nil {
			return fmt.Errorf("the sandbox's control network namespace: %w", err)
		}
	}
	return nil
}

// startKeeper starts the entry's keeper and waits until its sandbox runs.
func (p *Pool) startKeeper(ctx context.Context, e *Entry) error {
	k, err := shim.Start(shim.KeeperArgv0)
	if err != nil {
		close(e.Exited)
		return fmt.Errorf("starting a pool keeper: %w", err)
	}
	e.Keeper = k
	go func() {
		<-k.Exited
		close(e.Exited)
		p.keeperExited(e)
	}()
	dev, ino := e.Dir.Ident()
	r := e.Runsc
	if r.NetNS != "" {
		r.NetNS = bundle.ControlNetns // the keeper works in its directory, wherever it is moved
	}
	req := shim.KeeperRequest{Protocol: shim.Protocol, Dir: e.Path, Dev: dev, Ino: ino, RunscID: e.RunscID, Runsc: r, Flags: e.Flags}
	if err := k.Send(req); err != nil {
		return fmt.Errorf("starting a pool keeper: %w", err)
	}
	line, err := e.Reply(ctx, StartTimeout)
	if err != nil {
		return fmt.Errorf("waiting for an idle sandbox to start: %w; keeper log: %s", err, bundle.Tail(e.Dir, bundle.ShimLog))
	}
	if line != "ok" {
		return fmt.Errorf("%s", strings.TrimPrefix(line, "error: "))
	}
	return nil
}

// Reply reads the keeper's next answer, within ctx and timeout.
func (e *Entry) Reply(ctx context.Context, timeout time.Duration) (string, error) {
	line, err := e.Keeper.Answer(ctx, timeout)
	if errors.Is(err, shim.ErrNoAnswer) {
		return "", errors.New("the pool keeper exited without an answer")
	}
	return line, err
}

// Discard removes an entry that is not a cell's: its keeper deletes its sandbox when its request
// pipe closes; a keeper that does not is killed and the sandbox force-deleted. Then its cgroups
// and, once runsc holds nothing of it, the directory go.
func (p *Pool) Discard(e *Entry) error {
	var errs []error
	if k := e.Keeper; k != nil {
		_ = k.Requests.Close()
		select {
		case <-e.Exited:
		case <-time.After(keeperStopTimeout):
			_ = k.Cmd.Process.Kill() // through its pidfd: never another process
			select {
			case <-e.Exited:
			case <-time.After(exitGrace):
				errs = append(errs, fmt.Errorf("the pool keeper (pid %d) did not exit", k.Cmd.Process.Pid))
			}
		}
		_ = k.Answers.Close()
	}
	if err := RemoveSandbox(&e.Runsc, e.RunscID); err != nil {
		errs = append(errs, err)
	}
	if e.Limits != (cgroups.Limits{}) && p.cg != nil {
		if _, err := p.cg.Remove(e.RunscID, cgroupRemoveTimeout); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		if err := removeEntry(e.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	_ = e.Dir.Close()
	p.Disown(e.Name) // what is left is Recover's
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

// RemoveSandbox force-deletes a pool sandbox runsc still holds state of.
func RemoveSandbox(r *runsc.Runsc, id string) error {
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

// Close stops the filler and deletes every idle sandbox with its directory; ctx bounds the wait.
// It is idempotent, safe for concurrent use, and a no-op on a nil pool.
func (p *Pool) Close(ctx context.Context) error {
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
			return ctx.Err()
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
		_ = e.Keeper.Requests.Close() // every keeper deletes its sandbox at once
	}
	for i, e := range idle {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = p.Discard(e)
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
			// Current runsc's pinned null-netns, when no container is left.
			if rerr := r.ReleaseSharedState(); rerr != nil {
				p.log.Warn("cleaning runsc's state root", zap.String("root", r.Root), zap.Error(rerr))
			}
		}
	case <-ctx.Done():
		err = fmt.Errorf("%w; idle sandboxes may remain (their removal goes on in the background; Recover removes what is left)", ctx.Err())
	}
	p.closeErr = err
	close(p.closing)
	p.log.Info("warm pool closed", zap.Int("idleDeleted", len(idle)), zap.Duration("took", time.Since(start)), zap.Error(err))
	return err
}

// RemoveLeftovers removes the pool sandboxes of the bundle root that p (nil: no pool) does not own: the
// idle ones a dead supervisor left (its keepers delete them themselves once they see it gone;
// Recover finishes the job) — and those of another live Backend on the same root, which Recover,
// run once at supervisor start, treats the same. It also removes runsc state of pool sandboxes
// that have neither a pool directory nor a cell. Pool sandboxes never appear in the report. An
// entry of the pool directory the library did not make (its name is not its own poolName) is
// skipped with a warning.
func (p *Pool) RemoveLeftovers(ctx context.Context, l Leftovers) error {
	root := l.Root
	pdir, err := OpenDir(root, false)
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
			if p.Owns(name) || ctx.Err() != nil {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = l.removeEntry(pdir, name)
			}()
		}
		wg.Wait()
	}
	if l.Runsc.Path != "" {
		if err := p.removeOrphanState(l, pdir); err != nil {
			errs = append(errs, err)
		}
	}
	if pdir != nil && !p.Active() {
		_ = root.Remove(DirName) // when empty
	}
	return errors.Join(errs...)
}

// removeEntry removes one idle sandbox of another (dead) supervisor: its keeper is asked to
// delete it (SIGTERM) and killed if it does not; then runsc's state, its cgroups and the
// directory go.
func (l Leftovers) removeEntry(pdir *owned.Dir, name string) error {
	path := filepath.Join(pdir.Path(), name)
	d, err := pdir.OpenDir(name)
	if err != nil {
		l.Log.Warn("skipping an entry of the pool directory that is not the library's", zap.String("path", path), zap.Error(err))
		return nil
	}
	defer d.Close()
	dev, ino := d.Ident()
	if name != runsc.PoolName(l.Root.Path(), dev, ino) {
		if strings.HasPrefix(name, "new-") {
			// An entry whose making was interrupted before its rename: nothing ran in it.
			return bundle.Remove(pdir, name)
		}
		l.Log.Warn("skipping an entry of the pool directory that is not the library's", zap.String("path", path))
		return nil
	}
	if id, ok := l.Shims[proc.FileIdent{Dev: dev, Ino: ino}]; ok {
		if h, err := shim.Open(id, d); err == nil {
			_ = h.Signal(unix.SIGTERM) // an idle keeper deletes its sandbox and exits
			if !waitFor(h, keeperStopTimeout) {
				_ = h.Signal(unix.SIGKILL)
				waitFor(h, exitGrace)
			}
			_ = h.Close()
		}
	}
	r := l.Runsc
	r.NetNS = ""
	if _, err := d.Lstat(bundle.ControlNetns); err == nil && l.Confine {
		r.NetNS = filepath.Join(path, bundle.ControlNetns)
	}
	runscID := runsc.PoolIDPrefix + name
	var errs []error
	if err := RemoveSandbox(&r, runscID); err != nil {
		errs = append(errs, err)
	}
	if l.Cgroups != nil {
		if _, err := l.Cgroups.Remove(runscID, cgroupRemoveTimeout); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		if err := bundle.Remove(pdir, name); err != nil {
			errs = append(errs, err)
		}
	}
	l.Log.Info("removed an idle pool sandbox", zap.String("sandbox", runscID), zap.Error(errors.Join(errs...)))
	if len(errs) > 0 {
		return fmt.Errorf("pool sandbox %s: %w", path, errors.Join(errs...))
	}
	return nil
}

// removeOrphanState removes runsc containers with a pool id that no pool directory and no
// cell's bundle accounts for: a pool sandbox whose directory went while runsc kept it.
func (p *Pool) removeOrphanState(l Leftovers, pdir *owned.Dir) error {
	root := l.Root
	ids, _ := l.Runsc.StateIDs()
	inUse := map[string]bool{}
	names, _ := root.Entries()
	for _, name := range names {
		if !cellos.ValidID(name) {
			continue
		}
		if d, err := root.OpenDir(name); err == nil {
			if _, err := d.Lstat(bundle.SandboxSpec); err == nil {
				dev, ino := d.Ident()
				inUse[runsc.PoolID(root.Path(), dev, ino)] = true
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
		if p.Owns(name) {
			continue
		}
		if pdir != nil {
			if _, err := pdir.Lstat(name); err == nil {
				continue // its directory is there: removePoolEntry reported why it stayed
			}
		}
		r := l.Runsc
		r.NetNS = ""
		if err := RemoveSandbox(&r, id); err != nil {
			errs = append(errs, err)
		}
		if l.Cgroups != nil {
			if _, err := l.Cgroups.Remove(id, cgroupRemoveTimeout); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
