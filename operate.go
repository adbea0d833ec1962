package gvisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/shim"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
	"github.com/cellos/cellos-host-gvisor/internal/proc"
)

// Operating running cells: Exec, Signal, Stats, Pause, Resume, Checkpoint and Restore, and
// Attach and List for tools (cellrun) that operate on the cells of another process's Backend.
//
// Every operation takes the id of a cell this Backend tracks (ErrNotTracked otherwise). On a cell
// that is no longer running the error wraps ErrCellExited (and cellos.ErrHost). runsc's own
// failures wrap cellos.ErrHost and carry runsc's message.

// Errors of the operations on running cells, matched with errors.Is. Errors that wrap them also
// wrap cellos.ErrHost, the kind of the port they belong to.
var (
	// ErrCellExited: the operation needs a running cell, and this one has exited, was
	// checkpointed or is being destroyed.
	ErrCellExited = errors.New("the cell is not running")
	// ErrCheckpointed: WaitForExit of a cell that Checkpoint stopped. It has no exit status of its
	// own: its workload did not exit, runsc saved it and stopped the sandbox. Restore runs it on.
	ErrCheckpointed = errors.New("the cell was checkpointed and stopped")
)

// The bundle's checkpoint.json records a checkpoint under way or done: runsc run exits 0 when
// its container is checkpointed, and the shim reads it to record a checkpoint rather than an
// exit. Its paused file is present while the cell is paused through the library, so that
// Destroy and the shim's lifetime limit resume it before killing it: a paused sandbox does not
// take SIGKILL (Debian's runsc refuses to signal it; a forced delete panics).

// Bounds on the operations' own waits.
const (
	startTimeout     = 15 * time.Second // for a just-created cell's container to come up
	exitPublishGrace = 5 * time.Second  // for a stopped cell's shim to record its exit (it drains output for up to 3 s)
	execWaitDelay    = 2 * time.Second  // for the exec's output pipes after runsc exec exited
)

// live returns the tracked, running cell id, or the operation's error.
func (b *Backend) live(ctx context.Context, op, id string) (*cell, error) {
	if err := cellos.CheckID(op, id); err != nil {
		return nil, err
	}
	c := b.cells.get(id)
	if c != nil {
		select {
		case <-c.ready:
		case <-ctx.Done():
			return nil, cellos.NewError(op, id, cellos.ErrHost, ctx.Err())
		}
	}
	if c == nil || !c.created {
		return nil, cellos.Errorf(op, id, cellos.ErrNotTracked, "no such cell in this backend (Attach tracks a cell that another process created)")
	}
	if b.cells.isDestroying(c) {
		return nil, cellos.Errorf(op, id, cellos.ErrHost, "%w: it is being destroyed", ErrCellExited)
	}
	select {
	case <-c.exited:
		return nil, notRunning(op, c)
	default:
	}
	return c, nil
}

// running returns the tracked cell id once runsc runs it, or the operation's error.
func (b *Backend) running(ctx context.Context, op, id string) (*cell, error) {
	c, err := b.live(ctx, op, id)
	if err != nil {
		return nil, err
	}
	if err := b.awaitStarted(ctx, op, c); err != nil {
		return nil, err
	}
	return c, nil
}

// notRunning is the error of an operation on a cell that has exited.
func notRunning(op string, c *cell) error {
	how := fmt.Sprintf("it has exited (%s, code %d)", c.status.Reason, c.status.Code)
	switch {
	case errors.Is(c.waitErr, ErrCheckpointed):
		how = "it was checkpointed"
	case c.waitErr != nil:
		how = "it has ended without an exit status (WaitForExit tells why)"
	}
	return cellos.Errorf(op, c.id, cellos.ErrHost, "%w: %s", ErrCellExited, how)
}

// awaitStarted returns once runsc shows c's container running or paused. Create returns as soon
// as runsc has started, before the sandbox is up, and runsc refuses to operate on a container it
// does not know yet. Once seen running, a cell is not checked again.
func (b *Backend) awaitStarted(ctx context.Context, op string, c *cell) error {
	if c.started.Load() {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	var last error
	for delay := 5 * time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		st, err := c.runsc.State(ctx, c.paths.runscID)
		switch {
		case err != nil:
			last = err
		case st.Status == "running" || st.Status == "paused":
			c.started.Store(true)
			return nil
		case st.Status == "stopped":
			return b.failed(op, c, errors.New("runsc reports the container stopped"))
		default:
			last = fmt.Errorf("runsc reports the container %q", st.Status)
		}
		select {
		case <-c.exited:
			return notRunning(op, c)
		case <-ctx.Done():
			return cellos.Errorf(op, c.id, cellos.ErrHost, "waiting for the cell's container to start: %w (last: %w)", ctx.Err(), last)
		case <-time.After(delay):
		}
	}
}

// failed turns a failed runsc command on c into op's error: one wrapping ErrCellExited when the
// cell stopped meanwhile, else ErrHost with runsc's message.
func (b *Backend) failed(op string, c *cell, err error) error {
	if b.hasStopped(c) {
		return notRunning(op, c)
	}
	return cellos.NewError(op, c.id, cellos.ErrHost, err)
}

// hasStopped reports whether c has exited: its exit is published, or runsc no longer runs its
// container and the exit is published shortly after.
func (b *Backend) hasStopped(c *cell) bool {
	select {
	case <-c.exited:
		return true
	default:
	}
	ctx, cancel := context.WithTimeout(context.Background(), runscTimeout)
	st, err := c.runsc.State(ctx, c.paths.runscID)
	cancel()
	if err == nil && st.Status != "stopped" {
		return false
	}
	select {
	case <-c.exited:
		return true
	case <-time.After(exitPublishGrace):
		return false
	}
}

// management bounds a management command by runscTimeout within ctx.
func management(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, runscTimeout)
}

// Exec runs another process inside the running cell and returns its exit status. The process
// gets the cell's isolation: its sandbox, mounts and namespaces, no capabilities, no new
// privileges. run.Argv is required; run.User and run.WorkingDir default to the cell's own; run.Env
// is added to the cell's environment (a variable in both takes run's value). The process's stdout
// and stderr go to the writers (nil discards); its stdin is empty. Exit codes 129–192 are
// reported as deaths by signal, as for cells (an inference).
//
// When ctx is done before the process exits, the process and its descendants are killed
// (SIGKILL), nothing else of the cell, and the error wraps ctx.Err() and cellos.ErrHost.
func (b *Backend) Exec(ctx context.Context, cellID string, run cellos.RunSpec, stdout, stderr io.Writer) (cellos.ExitStatus, error) {
	const op = "exec"
	probe := cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind, Spec: cellos.CellSpec{ID: cellID, Run: run}}
	if err := probe.Validate(); err != nil {
		return cellos.ExitStatus{}, relabel(err, op)
	}
	if err := b.checkUser(op, cellID, run.User); err != nil {
		return cellos.ExitStatus{}, err
	}
	c, err := b.running(ctx, op, cellID)
	if err != nil {
		return cellos.ExitStatus{}, err
	}
	var spec specs.Spec
	if err := bundle.ReadConfig(c.dir, &spec); err != nil {
		return cellos.ExitStatus{}, cellos.NewError(op, cellID, cellos.ErrHost, err)
	}
	if spec.Process == nil {
		return cellos.ExitStatus{}, cellos.Errorf(op, cellID, cellos.ErrHost, "the cell's config.json has no process")
	}
	edir, err := c.dir.MkdirTemp("exec-", 0o700)
	if err != nil {
		return cellos.ExitStatus{}, cellos.NewError(op, cellID, cellos.ErrHost, err)
	}
	defer func() {
		name := filepath.Base(edir.Path())
		_ = edir.Close()
		_ = c.dir.RemoveAll(name)
	}()
	process, err := json.Marshal(execProcess(spec.Process, run))
	if err == nil {
		err = edir.WriteFile("process.json", process, 0o644)
	}
	if err != nil {
		return cellos.ExitStatus{}, cellos.NewError(op, cellID, cellos.ErrHost, err)
	}
	processFile, pidFile := filepath.Join(edir.Path(), "process.json"), filepath.Join(edir.Path(), "pid")
	flags := c.execFlags(&spec)
	flags.Log = filepath.Join(edir.Path(), "runsc.log")

	// Not bound to ctx: killing runsc exec would leave the process running in the cell.
	cmd := c.runsc.Command(context.Background(), c.runsc.ExecArgs(flags, c.paths.runscID, processFile, pidFile)...)
	cmd.Dir = c.paths.bundle
	outCap := &capWriter{w: stdout, left: b.opts.outputCap, name: "stdout"}
	errCap := &capWriter{w: stderr, left: b.opts.outputCap, name: "stderr"}
	cmd.Stdout, cmd.Stderr = outCap, errCap
	cmd.WaitDelay = execWaitDelay // a background child holding the output must not hold Exec
	if err := c.runsc.Start(cmd); err != nil {
		return cellos.ExitStatus{}, cellos.Errorf(op, cellID, cellos.ErrHost, "starting runsc exec: %w", err)
	}
	waited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-ctx.Done():
		b.killExec(c, cmd, edir, waited)
		return cellos.ExitStatus{}, cellos.Errorf(op, cellID, cellos.ErrHost, "%w: the process was killed", ctx.Err())
	}
	ps := cmd.ProcessState
	if ps == nil {
		return cellos.ExitStatus{}, cellos.Errorf(op, cellID, cellos.ErrHost, "waiting for runsc exec: %w", waitErr)
	}
	ws, _ := ps.Sys().(syscall.WaitStatus)
	if ws.Signaled() {
		return cellos.ExitStatus{}, cellos.Errorf(op, cellID, cellos.ErrHost, "runsc exec was killed by signal %d (%s)", int(ws.Signal()), ws.Signal())
	}
	code := ws.ExitStatus()
	if code == 128 {
		if msg := shim.RunscFailure(edir, "runsc.log"); msg != "" {
			return cellos.ExitStatus{}, b.failed(op, c, fmt.Errorf("runsc exec: %s", msg))
		}
	}
	if waitErr != nil && !errors.Is(waitErr, exec.ErrWaitDelay) {
		b.log.Warn("exec output copy failed", zap.String("cell", cellID), zap.Error(waitErr))
	}
	for _, w := range []*capWriter{outCap, errCap} {
		if w.dropped > 0 {
			b.log.Warn("exec output reached its cap and was truncated", zap.String("cell", cellID),
				zap.String("stream", w.name), zap.Int64("cap", b.opts.outputCap), zap.Int64("dropped", w.dropped))
		}
	}
	return shim.Classify(code), nil
}

// execFlags are the global runsc flags of an Exec into c: the ones it was started with, as the
// Backend knows them (its cgroups, root and network), not as a bundle file says.
func (c *cell) execFlags(spec *specs.Spec) runsc.CellFlags {
	f := runsc.CellFlags{IgnoreCgroups: c.handle.CgroupPath == nil, Overlay: "none", Network: c.net.runscNetwork()}
	if spec.Root != nil && !spec.Root.Readonly && !c.isPooled() {
		f.Overlay = "root:memory"
	}
	if c.runsc.NoOverlay2 {
		f.Overlay = ""
	}
	return f
}

// execProcess is the OCI process of an Exec: the cell's own process (user, working directory,
// environment, and with them no capabilities and no new privileges) with run's settings.
func execProcess(cell *specs.Process, run cellos.RunSpec) *specs.Process {
	empty := []string{}
	p := &specs.Process{
		Args: slices.Clone(run.Argv),
		Env:  mergeEnv(cell.Env, run.Env),
		Cwd:  cell.Cwd,
		User: specs.User{UID: cell.User.UID, GID: cell.User.GID},
		Capabilities: &specs.LinuxCapabilities{
			Bounding: empty, Effective: empty, Inheritable: empty, Permitted: empty, Ambient: empty,
		},
		NoNewPrivileges: true,
	}
	if run.WorkingDir != "" {
		p.Cwd = run.WorkingDir
	}
	if u := run.User; u != nil {
		p.User = specs.User{UID: u.UID, GID: u.GID}
	}
	return p
}

// mergeEnv sets the variables of over in base (KEY=value lines), keeping base's order and
// appending new keys in sorted order.
func mergeEnv(base []string, over map[string]string) []string {
	out := make([]string, 0, len(base)+len(over))
	set := map[string]bool{}
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if v, ok := over[k]; ok {
			kv = k + "=" + v
			set[k] = true
		}
		out = append(out, kv)
	}
	for _, k := range slices.Sorted(maps.Keys(over)) {
		if !set[k] {
			out = append(out, k+"="+over[k])
		}
	}
	return out
}

// killExec ends a cancelled exec: SIGKILL through runsc to the process it started inside the
// cell and to that process's descendants, then a wait for runsc exec, which reports the death
// and exits. If the process never started, or runsc exec hangs, runsc exec itself is killed.
func (b *Backend) killExec(c *cell, cmd *exec.Cmd, edir *owned.Dir, waited <-chan struct{}) {
	deadline := time.Now().Add(killGrace)
	pid := 0
	for delay := time.Millisecond; pid == 0 && time.Now().Before(deadline); delay = min(2*delay, 50*time.Millisecond) {
		if data, err := edir.ReadFile("pid", 64); err == nil {
			pid, _ = strconv.Atoi(strings.TrimSpace(string(data)))
		}
		if pid != 0 {
			break
		}
		select {
		case <-waited:
			return
		case <-time.After(delay):
		}
	}
	if pid != 0 {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		victims := []int{pid}
		if procs, err := c.runsc.Processes(ctx, c.paths.runscID); err == nil {
			victims = append(victims, descendantsOf(procs, pid)...)
		}
		for _, p := range victims {
			if err := c.runsc.KillProcess(ctx, c.paths.runscID, p, "KILL"); err != nil {
				b.log.Debug("killing an exec'd process", zap.String("cell", c.id), zap.Int("pid", p), zap.Error(err))
			}
		}
		cancel()
		select {
		case <-waited:
			return
		case <-time.After(time.Until(deadline)):
		}
	}
	b.log.Warn("runsc exec did not end with its process; killing it", zap.String("cell", c.id), zap.Int("pid", pid))
	_ = cmd.Process.Kill()
	<-waited
}

// descendantsOf lists the processes below pid in a pid -> parent map, parents first.
func descendantsOf(procs map[int]int, pid int) []int {
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, child := range slices.Sorted(maps.Keys(procs)) {
			if procs[child] == p && child != p && !slices.Contains(out, child) {
				out = append(out, child)
				queue = append(queue, child)
			}
		}
	}
	return out
}

// Signal sends sig to the cell's main process (its init, the process of run.argv), the way
// `docker kill` and `runc kill` do: the workload decides what its children get. gVisor does not
// shield a container's init from signals it does not handle, so SIGTERM ends a workload that
// does not trap it. Processes started with Exec are not signalled.
func (b *Backend) Signal(ctx context.Context, cellID string, sig syscall.Signal) error {
	const op = "signal"
	if sig <= 0 || sig > 64 {
		return cellos.Errorf(op, cellID, cellos.ErrInvalidSpec, "%d is not a signal number (1-64)", int(sig))
	}
	c, err := b.running(ctx, op, cellID)
	if err != nil {
		return err
	}
	mctx, cancel := management(ctx)
	defer cancel()
	if err := b.signalCell(mctx, c, sig); err != nil { // the workload: in a pool sandbox, not its init (pool.go)
		return b.failed(op, c, err)
	}
	return nil
}

// Stats are a running cell's resource figures.
type Stats struct {
	// MemoryBytes is the memory in use inside the sandbox as its kernel accounts it: the
	// workload's anonymous memory, page cache and tmpfs files (runsc events).
	MemoryBytes uint64 `json:"memoryBytes"`
	// CPUNanos is the host CPU time (user and system) the cell's sandbox has used since it
	// started: its cpuacct cgroup's figure when it has limits, else the sum of its host
	// processes' own counters (the sandbox, the gofer and the platform's stubs; 10 ms
	// resolution). Never runsc's figure for a cell without cgroups, which is the caller's.
	CPUNanos uint64 `json:"cpuNanos"`
	// Pids is the number of tasks in the sandbox (runsc events).
	Pids uint64 `json:"pids"`
	// HostMemoryBytes is what the cell costs the host's memory, the sandbox's own overhead
	// included: its memory cgroup's usage when it has limits, else the proportional set size of
	// its host processes.
	HostMemoryBytes uint64 `json:"hostMemoryBytes"`
}

// Stats returns the running cell's resource figures.
func (b *Backend) Stats(ctx context.Context, cellID string) (Stats, error) {
	const op = "stats"
	c, err := b.running(ctx, op, cellID)
	if err != nil {
		return Stats{}, err
	}
	mctx, cancel := management(ctx)
	defer cancel()
	ss, err := c.runsc.Stats(mctx, c.paths.runscID)
	if err != nil {
		return Stats{}, b.failed(op, c, err)
	}
	st := Stats{MemoryBytes: ss.Memory.Usage.Usage, Pids: ss.Pids.Current}
	if c.handle.CgroupPath != nil && b.cg != nil {
		u, err := b.cg.Usage(c.paths.runscID)
		if err != nil {
			return Stats{}, cellos.Errorf(op, cellID, cellos.ErrHost, "reading the cell's cgroups: %w", err)
		}
		st.CPUNanos, st.HostMemoryBytes = u.CPUNanos, u.MemoryBytes
		return st, nil
	}
	if !c.pid.Alive() {
		return Stats{}, b.failed(op, c, errors.New("the cell's shim is gone"))
	}
	for _, pid := range proc.Descendants(c.pid.Pid) {
		// A process that exits meanwhile has its time in its parent's reaped-children figures.
		if n, err := proc.CPUNanos(pid); err == nil {
			st.CPUNanos += n
		}
		if n, err := proc.PSSBytes(pid); err == nil {
			st.HostMemoryBytes += n
		}
	}
	return st, nil
}

// Pause freezes every process of the cell until Resume. A paused cell can still be destroyed
// (Destroy resumes it first) and inspected with Stats; runsc refuses Exec into it, and
// Checkpoint refuses it (runsc would save it without stopping it).
func (b *Backend) Pause(ctx context.Context, cellID string) error {
	const op = "pause"
	c, err := b.running(ctx, op, cellID)
	if err != nil {
		return err
	}
	// The marker comes first: a crash after the pause must not leave a cell Destroy cannot kill.
	if err := c.dir.WriteFile(bundle.Paused, nil, 0o644); err != nil && !errors.Is(err, fs.ErrExist) {
		return cellos.NewError(op, cellID, cellos.ErrHost, err)
	}
	mctx, cancel := management(ctx)
	defer cancel()
	if err := c.runsc.Pause(mctx, c.paths.runscID); err != nil {
		if st, serr := c.runsc.State(mctx, c.paths.runscID); serr != nil || st.Status != "paused" {
			_ = c.dir.Remove(bundle.Paused)
		}
		return b.failed(op, c, err)
	}
	return nil
}

// Resume thaws a cell that Pause froze.
func (b *Backend) Resume(ctx context.Context, cellID string) error {
	const op = "resume"
	c, err := b.running(ctx, op, cellID)
	if err != nil {
		return err
	}
	mctx, cancel := management(ctx)
	defer cancel()
	if err := c.runsc.Resume(mctx, c.paths.runscID); err != nil {
		if st, serr := c.runsc.State(mctx, c.paths.runscID); serr == nil && st.Status != "paused" {
			_ = c.dir.Remove(bundle.Paused)
		}
		return b.failed(op, c, err)
	}
	_ = c.dir.Remove(bundle.Paused)
	return nil
}

// Checkpoint saves the running cell — its processes, their memory, its tmpfs mounts — into
// imageDir (created if needed) and STOPS the cell: runsc checkpoints that way. (Debian's runsc
// cannot leave a cell running: with --leave-running it kills the cell after saving it.) The
// cell's waiters then get an error wrapping ErrCheckpointed instead of an exit status, since
// its workload did not exit; Destroy removes what is left of it as for any cell. Restore runs
// the saved state on, under a new id. Checkpoint returns once the cell has stopped. A paused
// cell is refused: Resume it first. ctx bounds the whole checkpoint, which grows with the cell's
// memory.
func (b *Backend) Checkpoint(ctx context.Context, cellID, imageDir string) error {
	const op = "checkpoint"
	if imageDir == "" {
		return cellos.Errorf(op, cellID, cellos.ErrInvalidSpec, "no image directory")
	}
	image, err := filepath.Abs(imageDir)
	if err != nil {
		return cellos.NewError(op, cellID, cellos.ErrInvalidSpec, err)
	}
	c, err := b.live(ctx, op, cellID)
	if err != nil {
		return err
	}
	if c.isPooled() {
		return cellos.Errorf(op, cellID, cellos.ErrUnsupported, "the cell runs in a warm-pool sandbox, whose checkpoint would hold the pool's idle process as the cell's; cells of a Backend without WithWarmPool can be checkpointed")
	}
	if err := b.awaitStarted(ctx, op, c); err != nil {
		return err
	}
	// Debian's runsc saves a paused container without stopping it, and it then stays paused:
	// the cell would neither stop nor run.
	mctx, cancel := management(ctx)
	st, err := c.runsc.State(mctx, c.paths.runscID)
	cancel()
	if err != nil {
		return b.failed(op, c, err)
	}
	if st.Status == "paused" {
		return cellos.Errorf(op, cellID, cellos.ErrHost, "the cell is paused; Resume it first")
	}
	imgDir, err := owned.Ensure(image, 0o700) // runsc writes into it as root: it must be ours
	if err != nil {
		return cellos.Errorf(op, cellID, cellos.ErrHost, "image directory: %w", err)
	}
	defer imgDir.Close()
	if err := bundle.WriteRecord(c.dir, bundle.Checkpoint, shim.CheckpointRecord{Image: image, At: time.Now().UTC()}); err != nil {
		return cellos.NewError(op, cellID, cellos.ErrHost, err)
	}
	start := time.Now()
	if err := c.runsc.Checkpoint(ctx, c.paths.runscID, image); err != nil {
		if b.hasStopped(c) {
			return b.checkpointOutcome(op, c, err)
		}
		_ = c.dir.Remove(bundle.Checkpoint)
		return cellos.NewError(op, cellID, cellos.ErrHost, err)
	}
	privateImage(imgDir)
	select {
	case <-c.exited:
	case <-ctx.Done():
	case <-time.After(exitPublishGrace):
		if !b.hasStopped(c) {
			// The record must not turn a later exit 0 of the workload into a checkpoint.
			_ = c.dir.Remove(bundle.Checkpoint)
			return cellos.Errorf(op, cellID, cellos.ErrHost, "runsc saved the cell into %s but did not stop it", image)
		}
	}
	if err := b.checkpointOutcome(op, c, nil); err != nil {
		return err
	}
	b.log.Info("cell checkpointed", zap.String("cell", cellID), zap.String("image", image), zap.Duration("took", time.Since(start)))
	return nil
}

// checkpointOutcome is Checkpoint's result once the cell has stopped: nil when the shim recorded
// the checkpoint; the cell's own exit (ErrCellExited) when the workload exited first — a natural
// exit that wins the race is reported as that exit, never as a checkpoint. runErr is runsc's
// error, if it failed.
func (b *Backend) checkpointOutcome(op string, c *cell, runErr error) error {
	select {
	case <-c.exited:
	case <-time.After(exitPublishGrace):
		if runErr != nil {
			return cellos.Errorf(op, c.id, cellos.ErrHost, "%w; the cell has stopped", runErr)
		}
		return nil // still being recorded; WaitForExit tells
	}
	if errors.Is(c.waitErr, ErrCheckpointed) {
		return nil
	}
	return notRunning(op, c)
}

// privateImage makes the files of a checkpoint image readable by the library's euid only: runsc
// writes them world-readable, and they hold the cell's memory.
func privateImage(dir *owned.Dir) {
	names, err := dir.Entries()
	if err != nil {
		return
	}
	for _, name := range names {
		if f, err := dir.OpenFile(name, os.O_RDONLY, 0); err == nil {
			_ = f.Chmod(0o600)
			_ = f.Close()
		}
	}
}

// Restore starts a new cell from a checkpoint image that Checkpoint wrote: the saved processes
// go on with their memory and tmpfs contents, under doc's id (a new one; the checkpointed cell
// may still exist). doc must describe the cell as it was checkpointed — the same mounts, root
// and resources — except for its id and lifetime (the TTL counts from the restore); runsc
// refuses an image that does not fit, and that failure, like a failure to run, comes from
// WaitForExit wrapping ErrHost with runsc's message. Everything else is as for Create: the
// output is captured from the restore on, the exit status is the workload's, Destroy removes it.
// (The hostname differs between runsc generations: Debian's keeps the checkpointed cell's id,
// current ones take the new one.)
func (b *Backend) Restore(ctx context.Context, doc *cellos.ExecutionCellDocument, imageDir string) (cellos.CellHandle, error) {
	const op = "restore"
	if err := doc.Validate(); err != nil {
		return cellos.CellHandle{}, relabel(err, op)
	}
	id := doc.Spec.ID
	if imageDir == "" {
		return cellos.CellHandle{}, cellos.Errorf(op, id, cellos.ErrInvalidSpec, "no image directory")
	}
	image, err := filepath.Abs(imageDir)
	if err != nil {
		return cellos.CellHandle{}, cellos.NewError(op, id, cellos.ErrInvalidSpec, err)
	}
	if !shim.CheckpointWritten(image) {
		return cellos.CellHandle{}, cellos.Errorf(op, id, cellos.ErrInvalidSpec, "%s holds no checkpoint (%s) in a directory of the library's", image, shim.CheckpointImage)
	}
	return b.launch(ctx, op, doc, image)
}

// Attach tracks a cell that another Backend — another process, such as a running supervisor —
// created on the same bundle root, so that this Backend can operate on it (Exec, Signal, Stats,
// Pause, Resume, Checkpoint), wait for it or destroy it. It is how cellrun reaches the cells of
// a running supervisor. Attach takes nothing over and changes nothing of the cell: its creator
// keeps tracking it, and both see the same exit (the shim records it in the bundle). The cell is
// operated with this Backend's runsc binary and state root: nothing of the bundle says which.
//
// A cell whose shim runs, or whose shim recorded its end, is attached; a cell this Backend
// already tracks gives its handle. Anything else — no bundle, a bundle whose shim died without
// a record — is ErrNotTracked, and nothing is cleaned (Recover and Destroy do that).
func (b *Backend) Attach(ctx context.Context, cellID string) (cellos.CellHandle, error) {
	const op = "attach"
	if err := cellos.CheckID(op, cellID); err != nil {
		return cellos.CellHandle{}, err
	}
	loc := b.locate()
	c := b.newCell(cellID, loc)
	if other := b.cells.claim(c); other != nil {
		select {
		case <-other.ready:
		case <-ctx.Done():
			return cellos.CellHandle{}, cellos.NewError(op, cellID, cellos.ErrHost, ctx.Err())
		}
		if other.created && !b.cells.isDestroying(other) {
			return other.handle, nil
		}
		return cellos.CellHandle{}, cellos.Errorf(op, cellID, cellos.ErrNotTracked, "the cell is being created or destroyed here")
	}
	notTracked := func(why error) (cellos.CellHandle, error) {
		b.cells.release(c)
		close(c.ready)
		return cellos.CellHandle{}, cellos.Errorf(op, cellID, cellos.ErrNotTracked, "no live cell with this id in %s: %w", loc.root, why)
	}
	root, err := openExistingRoot(loc)
	if err != nil {
		b.cells.release(c)
		close(c.ready)
		return cellos.CellHandle{}, cellos.NewError(op, cellID, cellos.ErrHost, err)
	}
	if root == nil {
		return notTracked(errors.New("the bundle root does not exist"))
	}
	defer root.Close()
	if _, err := b.openBundle(c, root); err != nil {
		return notTracked(err)
	}
	if err := b.knowRunsc(ctx, c, loc); err != nil {
		_ = c.dir.Close()
		b.cells.release(c)
		close(c.ready)
		return cellos.CellHandle{}, relabel(err, op)
	}
	if !b.adopt(c, shim.FindAll()) {
		_ = c.dir.Close()
		return notTracked(errors.New("no shim serves it and it recorded no exit"))
	}
	b.log.Info("cell attached", zap.String("cell", cellID), zap.String("bundle", c.paths.bundle))
	return c.handle, nil
}

// CellInfo is what List reports of one cell of the bundle root.
type CellInfo struct {
	ID string `json:"id"`
	// Status is "running", "paused", "exited" (Exit tells how), "failed" (runsc failed),
	// "checkpointed", or "lost" (its shim died without recording an end, or never started;
	// Recover and Destroy clean it).
	Status string             `json:"status"`
	Exit   *cellos.ExitStatus `json:"exit,omitempty"`
	Bundle string             `json:"bundle"`
	// Tracked: this Backend tracks the cell.
	Tracked bool `json:"tracked"`
}

// List reports the cells of the bundle root, whichever process created them, sorted by id. It
// reads the bundles and the processes only; it runs no runsc command and changes nothing.
func (b *Backend) List(ctx context.Context) ([]CellInfo, error) {
	const op = "list"
	loc := b.locate()
	root, err := openExistingRoot(loc)
	if err != nil {
		return nil, cellos.NewError(op, "", cellos.ErrHost, err)
	}
	if root == nil {
		return nil, nil
	}
	defer root.Close()
	names, err := root.Entries()
	if err != nil {
		return nil, cellos.NewError(op, "", cellos.ErrHost, err)
	}
	shims := shim.FindAll()
	var out []CellInfo
	for _, id := range names {
		if strings.HasPrefix(id, ".") || !cellos.ValidID(id) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return out, cellos.NewError(op, "", cellos.ErrHost, err)
		}
		dir, err := root.OpenDir(id)
		if err != nil {
			continue // not a directory of the library's
		}
		if !bundle.HasMarker(dir, id) {
			_ = dir.Close()
			continue
		}
		info := CellInfo{ID: id, Bundle: dir.Path(), Status: "lost"}
		if c := b.cells.get(id); c != nil && c.created {
			info.Tracked = true
		}
		var rec shim.ExitRecord
		dev, ino := dir.Ident()
		_, running := shims[proc.FileIdent{Dev: dev, Ino: ino}]
		switch {
		case bundle.ReadRecord(dir, bundle.Exit, &rec) == nil:
			switch {
			case rec.Checkpoint != "":
				info.Status = "checkpointed"
			case rec.Error != "":
				info.Status = "failed"
			default:
				info.Status = "exited"
				info.Exit = &rec.Status
			}
		case running:
			info.Status = "running"
			if _, err := dir.Lstat(bundle.Paused); err == nil {
				info.Status = "paused"
			}
		}
		_ = dir.Close()
		out = append(out, info)
	}
	return out, nil
}

// knowRunsc completes an untracked cell's runsc from the Backend's own configuration: the
// binary's probe (cached) gives the platform and features the Backend's Creates would use.
func (b *Backend) knowRunsc(ctx context.Context, c *cell, loc location) error {
	if loc.runscErr != nil {
		return cellos.NewError("attach", c.id, cellos.ErrHost, loc.runscErr)
	}
	info, err := b.runtime(ctx, c.runsc.Path, "attach", c.id)
	if err != nil {
		return err
	}
	c.runsc.Platform = b.platformFlag(info)
	c.runsc.NoOverlay2 = !info.Features.Overlay2
	return nil
}

// capWriter passes on at most left bytes to w (nil discards) and counts the rest: an exec'd
// process's output is bounded like a cell's streams (WithOutputCap). The first byte over the cap
// is replaced by a line that says so.
type capWriter struct {
	w       io.Writer
	left    int64
	name    string
	dropped int64
}

func (c *capWriter) Write(p []byte) (int, error) {
	n := int64(len(p))
	keep := min(n, max(c.left, 0))
	c.left -= keep
	if keep < n {
		if c.dropped == 0 && c.w != nil {
			defer fmt.Fprintf(c.w, "\n[cellos: %s truncated]\n", c.name)
		}
		c.dropped += n - keep
	}
	if c.w != nil && keep > 0 {
		if _, err := c.w.Write(p[:keep]); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}
