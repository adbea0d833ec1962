package gvisor_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// execIn runs argv in the cell with the cell's defaults and returns the status and output.
func (e *realEnv) execIn(id string, run cellos.RunSpec) (cellos.ExitStatus, string, string, error) {
	e.t.Helper()
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := e.b.Exec(ctx, id, run, &stdout, &stderr)
	return st, stdout.String(), stderr.String(), err
}

// waitOutput waits until the cell's stdout satisfies ok and returns it.
func (e *realEnv) waitOutput(id string, ok func(string) bool) string {
	e.t.Helper()
	var out string
	require.Eventually(e.t, func() bool {
		out = e.out(id).stdout.String()
		return ok(out)
	}, 20*time.Second, 10*time.Millisecond, "output of %s: %q", id, e.out(id).stdout.String())
	return out
}

func hasLine(line string) func(string) bool {
	return func(out string) bool { return strings.Contains(out, line+"\n") }
}

// lastNumber is the last line of a counter's output, as a number.
func lastNumber(t *testing.T, out string) int {
	t.Helper()
	ls := strings.Split(strings.TrimSpace(out), "\n")
	n, err := strconv.Atoi(strings.Fields(ls[len(ls)-1])[0])
	require.NoError(t, err, "output %q", out)
	return n
}

func argv(args ...string) cellos.RunSpec { return cellos.RunSpec{Argv: args} }

func TestOperateExecExitCodesAndOutput(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	h := e.create(sh("op-exec-codes", "sleep 60"))

	st, stdout, stderr, err := e.execIn(h.CellID, argv("/bin/sh", "-c", "echo out; echo err >&2; exit 7"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 7, Reason: cellos.ExitExited}, st)
	assert.Equal(t, "out\n", stdout)
	assert.Equal(t, "err\n", stderr)

	st, _, _, err = e.execIn(h.CellID, argv("/bin/true"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 0, Reason: cellos.ExitExited}, st)

	st, _, _, err = e.execIn(h.CellID, argv("/bin/sh", "-c", "kill -TERM $$"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 143, Signal: 15, Reason: cellos.ExitSignaled}, st)

	// runsc's own failure exits 128 too: it is an error with runsc's message, not a status.
	_, _, _, err = e.execIn(h.CellID, argv("/bin/nothere"))
	require.Error(t, err)
	assert.ErrorIs(t, err, cellos.ErrHost)
	assert.NotErrorIs(t, err, gvisor.ErrCellExited)
	assert.Contains(t, err.Error(), "/bin/nothere")
	assert.Contains(t, err.Error(), `exec cell "op-exec-codes"`)
	// A workload's own exit 128 is a status.
	st, _, _, err = e.execIn(h.CellID, argv("/bin/sh", "-c", "exit 128"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 128, Reason: cellos.ExitExited}, st)

	_, _, _, err = e.execIn(h.CellID, cellos.RunSpec{})
	assert.ErrorIs(t, err, cellos.ErrInvalidSpec)
	assert.Contains(t, err.Error(), "spec.run.argv")
	_, _, _, err = e.execIn(h.CellID, cellos.RunSpec{Argv: []string{"/bin/true"}, WorkingDir: "relative"})
	assert.ErrorIs(t, err, cellos.ErrInvalidSpec)

	// The cell itself was not disturbed.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = e.b.WaitForExit(ctx, h.CellID)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
}

func TestOperateExecIdentity(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t, gvisor.WithAllowRoot(true)) // root in an exec'd process below
	d := sh("op-exec-who", "sleep 60")
	d.Spec.Run.Env = map[string]string{"CELL_VAR": "from-cell", "SHARED": "cell"}
	d.Spec.Run.WorkingDir = "/tmp"
	h := e.create(d)
	script := `echo "uid=$(id -u) gid=$(id -g)"; echo "cwd=$(pwd)"; echo "vars=$CELL_VAR,$EXEC_VAR,$SHARED"
echo "caps=$(grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status | awk '{print $2}' | sort -u | tr '\n' ' ')"
echo "nnp=$(python3 -c 'import ctypes; print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))')"`

	// By default: the cell's user, working directory and environment (runsc alone would exec as root).
	st, stdout, stderr, err := e.execIn(h.CellID, argv("/bin/sh", "-c", script))
	require.NoError(t, err)
	require.Equal(t, 0, st.Code, "stderr: %s", stderr)
	got := lines(stdout)
	assert.Equal(t, "uid=65534 gid=65534", "uid="+got["uid"])
	assert.Equal(t, "/tmp", got["cwd"])
	assert.Equal(t, "from-cell,,cell", got["vars"])
	assert.Equal(t, "0000000000000000", got["caps"])
	assert.Equal(t, "1", got["nnp"])

	// Root is refused unless the operator allows it.
	strict := newRealEnv(t)
	hs := strict.create(sh("op-exec-strict", "sleep 60"))
	_, _, _, err = strict.execIn(hs.CellID, cellos.RunSpec{Argv: []string{"/bin/true"}, User: &cellos.UserSpec{UID: 0, GID: 0}})
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
	assert.Contains(t, err.Error(), "WithAllowRoot")

	// As asked: even as root, no capabilities and no new privileges.
	for _, u := range []cellos.UserSpec{{UID: 1000, GID: 1001}, {UID: 0, GID: 0}} {
		run := cellos.RunSpec{Argv: []string{"/bin/sh", "-c", script}, User: &u, WorkingDir: "/",
			Env: map[string]string{"EXEC_VAR": "from-exec", "SHARED": "exec"}}
		st, stdout, stderr, err = e.execIn(h.CellID, run)
		require.NoError(t, err)
		require.Equal(t, 0, st.Code, "stderr: %s", stderr)
		got = lines(stdout)
		assert.Equal(t, fmt.Sprintf("uid=%d gid=%d", u.UID, u.GID), "uid="+got["uid"])
		assert.Equal(t, "/", got["cwd"])
		assert.Equal(t, "from-cell,from-exec,exec", got["vars"])
		assert.Equal(t, "0000000000000000", got["caps"], "uid %d", u.UID)
		assert.Equal(t, "1", got["nnp"], "uid %d", u.UID)
	}
}

func TestOperateOnExitedCell(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	h := e.create(sh("op-exec-exited", "exit 3"))
	st, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	require.Equal(t, 3, st.Code)
	ctx := context.Background()
	_, _, _, err = e.execIn(h.CellID, argv("/bin/true"))
	errs := map[string]error{"exec": err}
	errs["signal"] = e.b.Signal(ctx, h.CellID, syscall.SIGTERM)
	_, errs["stats"] = e.b.Stats(ctx, h.CellID)
	errs["pause"] = e.b.Pause(ctx, h.CellID)
	errs["resume"] = e.b.Resume(ctx, h.CellID)
	errs["checkpoint"] = e.b.Checkpoint(ctx, h.CellID, t.TempDir())
	for op, err := range errs {
		require.Error(t, err, op)
		assert.ErrorIs(t, err, gvisor.ErrCellExited, op)
		assert.ErrorIs(t, err, cellos.ErrHost, op)
		assert.NotErrorIs(t, err, cellos.ErrNotTracked, op)
		assert.Contains(t, err.Error(), "has exited (exited, code 3)", op)
		assert.Contains(t, err.Error(), op+` cell "op-exec-exited"`)
	}
	// The status is untouched.
	st, err = e.b.WaitForExit(ctx, h.CellID)
	require.NoError(t, err)
	assert.Equal(t, 3, st.Code)
}

func TestOperateExecCancelKillsOnlyTheProcess(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	h := e.create(sh("op-exec-cancel", `echo up; i=0; while [ $i -lt 40 ]; do sleep 0.1; i=$((i+1)); done; echo done; exit 4`))
	e.waitOutput(h.CellID, hasLine("up"))

	ctx, cancel := context.WithTimeout(context.Background(), 800*time.Millisecond)
	defer cancel()
	var stdout bytes.Buffer
	start := time.Now()
	// The exec'd shell and a child of its own, in the background.
	_, err := e.b.Exec(ctx, h.CellID, argv("/bin/sh", "-c", `echo $$ > /tmp/exec.pid; sleep 60 & echo $! > /tmp/child.pid; echo started; wait`), &stdout, nil)
	require.Error(t, err)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.ErrorIs(t, err, cellos.ErrHost)
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.Equal(t, "started\n", stdout.String())

	// Both are gone (dead or a zombie about to be reaped); the cell goes on.
	st, out, stderr, err := e.execIn(h.CellID, argv("/bin/sh", "-c", `
for f in exec child; do
  pid=$(cat /tmp/$f.pid)
  for i in $(seq 50); do
    state=$(awk '{print $3}' /proc/$pid/stat 2>/dev/null)
    [ -z "$state" ] || [ "$state" = Z ] && break
    sleep 0.1
  done
  echo "$f=${state:-gone}"
done`))
	require.NoError(t, err)
	require.Equal(t, 0, st.Code, "stderr: %s", stderr)
	got := lines(out)
	assert.Contains(t, []string{"gone", "Z"}, got["exec"], "the exec'd shell: %s", out)
	assert.Contains(t, []string{"gone", "Z"}, got["child"], "the exec'd shell's child: %s", out)

	st, err = e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 4, Reason: cellos.ExitExited}, st)
	assert.Equal(t, "up\ndone\n", e.out(h.CellID).stdout.String())
}

func TestOperateSignalTrapped(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	h := e.create(sh("op-sig-trap", `trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done`))
	e.waitOutput(h.CellID, hasLine("ready"))
	require.NoError(t, e.b.Signal(context.Background(), h.CellID, syscall.SIGTERM))
	st, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 42, Reason: cellos.ExitExited}, st)
	assert.Equal(t, "ready\ngot TERM\n", e.out(h.CellID).stdout.String())

	// A workload that does not trap it dies of it: gVisor does not shield a container's init.
	h2 := e.create(sh("op-sig-plain", "echo ready; sleep 60"))
	e.waitOutput(h2.CellID, hasLine("ready"))
	require.NoError(t, e.b.Signal(context.Background(), h2.CellID, syscall.SIGTERM))
	st, err = e.b.WaitForExit(context.Background(), h2.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 143, Signal: 15, Reason: cellos.ExitSignaled}, st)

	err = e.b.Signal(context.Background(), h.CellID, 0)
	assert.ErrorIs(t, err, cellos.ErrInvalidSpec)
}

// allocScript waits for /tmp/go, then holds 96 MiB of touched memory.
const allocScript = `
import os, sys, time
print("ready", flush=True)
while not os.path.exists("/tmp/go"):
    time.sleep(0.02)
a = bytearray(96 << 20)
for i in range(0, len(a), 4096):
    a[i] = 1
print("allocated", flush=True)
time.sleep(60)
`

func TestOperateStatsMemory(t *testing.T) {
	t.Parallel()
	for _, limits := range []bool{false, true} {
		t.Run(fmt.Sprintf("cgroups=%v", limits), func(t *testing.T) {
			t.Parallel()
			e := newRealEnv(t, gvisor.WithDefaultResources(gvisor.DefaultResources{})) // no limits unless declared
			d := doc(fmt.Sprintf("op-mem-cg%v-%d", limits, os.Getpid()), "/usr/bin/python3", "-c", allocScript)
			if limits {
				d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 512 << 20}
			}
			h := e.create(d)
			require.Equal(t, limits, h.CgroupPath != nil)
			e.waitOutput(h.CellID, hasLine("ready"))
			before, err := e.b.Stats(context.Background(), h.CellID)
			require.NoError(t, err)
			st, _, _, err := e.execIn(h.CellID, argv("/bin/sh", "-c", "touch /tmp/go"))
			require.NoError(t, err)
			require.Equal(t, 0, st.Code)
			e.waitOutput(h.CellID, hasLine("allocated"))
			after, err := e.b.Stats(context.Background(), h.CellID)
			require.NoError(t, err)
			t.Logf("before %+v, after %+v", before, after)
			assert.GreaterOrEqual(t, after.MemoryBytes, before.MemoryBytes+80<<20)
			assert.GreaterOrEqual(t, after.HostMemoryBytes, before.HostMemoryBytes+80<<20)
			assert.Less(t, after.MemoryBytes, uint64(400<<20))
			assert.GreaterOrEqual(t, after.Pids, uint64(1))
			assert.Less(t, after.Pids, uint64(64))
		})
	}
}

func TestOperateStatsCPU(t *testing.T) {
	t.Parallel()
	for _, limits := range []bool{false, true} {
		t.Run(fmt.Sprintf("cgroups=%v", limits), func(t *testing.T) {
			t.Parallel()
			e := newRealEnv(t)
			d := sh(fmt.Sprintf("op-cpu-cg%v-%d", limits, os.Getpid()), "echo spinning; while :; do :; done")
			if limits {
				d.Spec.Resources = &cellos.ResourceSpec{CPUMillis: 500}
			}
			created := time.Now()
			h := e.create(d)
			e.waitOutput(h.CellID, hasLine("spinning"))
			before, err := e.b.Stats(context.Background(), h.CellID)
			require.NoError(t, err)
			time.Sleep(time.Second)
			after, err := e.b.Stats(context.Background(), h.CellID)
			require.NoError(t, err)
			t.Logf("before %+v, after %+v", before, after)
			// At least a fifth of a core over that second (half a core is the cell's limit).
			assert.GreaterOrEqual(t, after.CPUNanos, before.CPUNanos+uint64(200*time.Millisecond))
			// The cell's own figure, not the caller's: no more than every core all along.
			bound := uint64(time.Since(created)) * uint64(max(2, numCPU()))
			assert.LessOrEqual(t, after.CPUNanos, bound)
		})
	}
}

func numCPU() int {
	data, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(data), "processor\t:")
}

func TestOperatePauseResume(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	h := e.create(sh("op-pause", `i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done`))
	e.waitOutput(h.CellID, func(out string) bool { return strings.Count(out, "\n") >= 3 })
	ctx := context.Background()
	require.NoError(t, e.b.Pause(ctx, h.CellID))
	time.Sleep(300 * time.Millisecond) // a line runsc wrote before it froze may still be on its way
	paused := lastNumber(t, e.out(h.CellID).stdout.String())
	time.Sleep(time.Second)
	assert.Equal(t, paused, lastNumber(t, e.out(h.CellID).stdout.String()), "a paused cell makes no progress")

	_, err := e.b.Stats(ctx, h.CellID)
	assert.NoError(t, err, "stats of a paused cell")
	_, _, _, err = e.execIn(h.CellID, argv("/bin/true"))
	assert.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "paused")
	err = e.b.Pause(ctx, h.CellID)
	assert.ErrorIs(t, err, cellos.ErrHost, "pausing twice")
	assert.NotErrorIs(t, err, gvisor.ErrCellExited)
	// runsc would save a paused cell without stopping it, leaving it paused.
	err = e.b.Checkpoint(ctx, h.CellID, t.TempDir())
	assert.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "paused")

	require.NoError(t, e.b.Resume(ctx, h.CellID))
	e.waitOutput(h.CellID, func(out string) bool { return lastNumber(t, out) >= paused+5 })
	assert.ErrorIs(t, e.b.Resume(ctx, h.CellID), cellos.ErrHost, "resuming a running cell")
	// Still paused-free: Destroy of a resumed cell is the ordinary one.
	e.waitOutput(h.CellID, func(out string) bool { return lastNumber(t, out) >= paused+10 })
}

func TestOperateDestroyPausedLeavesNothing(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	// Cgroup paths are global on the host: the pid keeps concurrent runs of this test apart.
	d := sh(fmt.Sprintf("op-destroy-paused-%d", os.Getpid()), "echo up; sleep 60")
	d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 256 << 20}
	h, err := e.b.Create(context.Background(), d)
	require.NoError(t, err)
	e.waitOutput(h.CellID, hasLine("up"))
	require.NoError(t, e.b.Pause(context.Background(), h.CellID))
	waited := make(chan cellos.ExitStatus, 1)
	go func() {
		st, _ := e.b.WaitForExit(context.Background(), h.CellID)
		waited <- st
	}()
	start := time.Now()
	rep, err := e.b.Destroy(context.Background(), h)
	took := time.Since(start)
	require.NoError(t, err)
	assert.True(t, rep.Destroyed)
	assert.Less(t, took, 4*time.Second, "Destroy of a paused cell (killing it without resuming takes 5 s and more)")
	assert.Equal(t, cellos.ExitDestroyed, (<-waited).Reason)
	assert.Empty(t, e.leftovers())
	assert.Empty(t, e.cgroupDirs(h.CellID))
}

func TestOperatePausedCellTTL(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	const ttl = 6 * time.Second
	d := sh("op-ttl-paused", "echo up; sleep 60")
	d.Spec.Lifetime = &cellos.LifetimeSpec{TTLSeconds: int64(ttl / time.Second)}
	start := time.Now()
	h := e.create(d)
	e.waitOutput(h.CellID, hasLine("up"))
	require.NoError(t, e.b.Pause(context.Background(), h.CellID))
	st, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitDeadlineExceeded, st.Reason)
	// Without resuming it first, the kill would wait 5 s for nothing, then fall back to killing
	// runsc and a forced delete (Debian's panics on a paused container after 5 s more).
	assert.Less(t, time.Since(start), ttl+4*time.Second, "the lifetime limit resumes a paused cell to kill it")
}

// counterScript counts in a shell variable (memory) and in a tmpfs file; each line is
// "<count> <count in the file before>", so a restored cell shows both went on. It exits 7 at 40.
const counterScript = `n=0; echo 0 > /scratch/n
while [ $n -lt 40 ]; do prev=$(cat /scratch/n); n=$((n+1)); echo "$n $prev"; echo $n > /scratch/n; sleep 0.05; done
exit 7`

func counterDoc(id string) *cellos.ExecutionCellDocument {
	d := sh(id, counterScript)
	d.Spec.Mounts = []cellos.MountSpec{{Type: cellos.MountTmpfs, Destination: "/scratch", SizeBytes: 1 << 20}}
	return d
}

func TestOperateCheckpointRestore(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	image := filepath.Join(t.TempDir(), "image")
	h := e.create(counterDoc("op-ckpt-src"))
	e.waitOutput(h.CellID, hasLine("5 4"))
	require.NoError(t, e.b.Checkpoint(context.Background(), h.CellID, image))
	fi, err := os.Stat(filepath.Join(image, "checkpoint.img"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "the image holds the cell's memory: the euid's only")
	fi, err = os.Stat(image)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())

	// The checkpointed cell stopped; it did not exit, and does not pretend to.
	_, err = e.b.WaitForExit(context.Background(), h.CellID)
	require.Error(t, err)
	assert.ErrorIs(t, err, gvisor.ErrCheckpointed)
	assert.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), image)
	_, _, _, err = e.execIn(h.CellID, argv("/bin/true"))
	assert.ErrorIs(t, err, gvisor.ErrCellExited)
	assert.Contains(t, err.Error(), "checkpointed")
	last := lastNumber(t, e.out(h.CellID).stdout.String())
	require.Less(t, last, 40)

	// Restored under a new id, while the checkpointed cell's remains still exist.
	r, err := e.b.Restore(context.Background(), counterDoc("op-ckpt-dst"), image)
	require.NoError(t, err)
	t.Cleanup(func() { e.destroy(r) })
	assert.Equal(t, "op-ckpt-dst", r.CellID)
	st, out, _, err := e.execIn(r.CellID, argv("/bin/cat", "/scratch/n"))
	require.NoError(t, err)
	require.Equal(t, 0, st.Code)
	n, err := strconv.Atoi(strings.Fields(out)[0])
	require.NoError(t, err)
	assert.Greater(t, n, last-1, "the tmpfs state went on")

	st, err = e.b.WaitForExit(context.Background(), r.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 7, Reason: cellos.ExitExited}, st)
	restored := e.out(r.CellID).stdout.String()
	first := strings.SplitN(restored, "\n", 2)[0]
	assert.Equal(t, fmt.Sprintf("%d %d", last+1, last), first, "the counter goes on from where it was")
	assert.True(t, strings.HasSuffix(restored, "40 39\n"), "restored output: %q", restored)
	data, err := os.ReadFile(filepath.Join(e.root, r.CellID, "stdout.log"))
	require.NoError(t, err)
	assert.Equal(t, restored, string(data))

	// A second restore of the same image under the id of a live cell is refused.
	_, err = e.b.Restore(context.Background(), counterDoc("op-ckpt-dst"), image)
	assert.ErrorIs(t, err, cellos.ErrAlreadyExists)
	_, err = e.b.Restore(context.Background(), counterDoc("op-ckpt-none"), t.TempDir())
	assert.ErrorIs(t, err, cellos.ErrInvalidSpec)
	assert.Contains(t, err.Error(), "checkpoint")
}

func TestOperateRestoreBadImage(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	image := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(image, "checkpoint.img"), []byte("not a checkpoint"), 0o600))
	// Restore starts runsc; runsc's refusal comes, like any failure to run, from WaitForExit.
	r, err := e.b.Restore(context.Background(), counterDoc("op-bad-image"), image)
	require.NoError(t, err)
	t.Cleanup(func() { e.destroy(r) })
	_, err = e.b.WaitForExit(context.Background(), r.CellID)
	require.Error(t, err)
	assert.ErrorIs(t, err, cellos.ErrHost)
	assert.NotErrorIs(t, err, gvisor.ErrCheckpointed)
	assert.Contains(t, err.Error(), "runsc failed")
	t.Log(err)
}

func TestOperateUnknownIDs(t *testing.T) {
	t.Parallel()
	b, err := gvisor.New(gvisor.WithBundleRoot(t.TempDir()), gvisor.WithLogger(zaptest.NewLogger(t)))
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	ctx := context.Background()
	for _, id := range []string{"nosuch", "../x"} {
		kind := cellos.ErrNotTracked
		if id == "../x" {
			kind = cellos.ErrInvalidSpec
		}
		_, err := b.Exec(ctx, id, argv("/bin/true"), nil, nil)
		errs := []error{err}
		errs = append(errs, b.Signal(ctx, id, syscall.SIGTERM))
		_, err = b.Stats(ctx, id)
		errs = append(errs, err)
		errs = append(errs, b.Pause(ctx, id), b.Resume(ctx, id), b.Checkpoint(ctx, id, t.TempDir()))
		_, err = b.Attach(ctx, id)
		errs = append(errs, err)
		for i, err := range errs {
			require.Error(t, err, "operation %d on %q", i, id)
			assert.ErrorIs(t, err, kind, "operation %d on %q: %v", i, id, err)
			var ce *cellos.Error
			require.True(t, errors.As(err, &ce))
		}
	}
	cells, err := b.List(ctx)
	require.NoError(t, err)
	assert.Empty(t, cells)
}

func TestOperateAttach(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	// The supervisor's backend creates the cells; an operator's (another Backend on the same
	// root, as cellrun makes) attaches to them.
	h := e.create(sh("op-attach-live", "echo up; sleep 60"))
	e.create(sh("op-attach-done", "exit 5"))
	_, err := e.b.WaitForExit(context.Background(), "op-attach-done")
	require.NoError(t, err)
	e.waitOutput(h.CellID, hasLine("up"))
	op, err := gvisor.New(gvisor.WithBundleRoot(e.root), gvisor.WithLogger(zaptest.NewLogger(t)))
	require.NoError(t, err)
	t.Cleanup(func() { _ = op.Close(context.Background()) })
	ctx := context.Background()

	_, err = op.Stats(ctx, h.CellID)
	require.ErrorIs(t, err, cellos.ErrNotTracked, "not attached yet")
	ah, err := op.Attach(ctx, h.CellID)
	require.NoError(t, err)
	assert.Equal(t, h.CellID, ah.CellID)
	again, err := op.Attach(ctx, h.CellID)
	require.NoError(t, err)
	assert.Equal(t, ah, again)
	var stdout bytes.Buffer
	st, err := op.Exec(ctx, h.CellID, argv("/bin/echo", "hello from the operator"), &stdout, nil)
	require.NoError(t, err)
	assert.Equal(t, 0, st.Code)
	assert.Equal(t, "hello from the operator\n", stdout.String())
	_, err = op.Stats(ctx, h.CellID)
	require.NoError(t, err)
	require.NoError(t, op.Pause(ctx, h.CellID))

	cells, err := op.List(ctx)
	require.NoError(t, err)
	require.Len(t, cells, 2)
	assert.Equal(t, "op-attach-done", cells[0].ID)
	assert.Equal(t, "exited", cells[0].Status)
	assert.Equal(t, &cellos.ExitStatus{Code: 5, Reason: cellos.ExitExited}, cells[0].Exit)
	assert.False(t, cells[0].Tracked)
	assert.Equal(t, gvisor.CellInfo{ID: "op-attach-live", Status: "paused", Bundle: filepath.Join(e.root, "op-attach-live"), Tracked: true}, cells[1])

	// The exited cell can be attached too, for its status; an unknown id cannot, and nothing is
	// cleaned by trying.
	_, err = op.Attach(ctx, "op-attach-done")
	require.NoError(t, err)
	st, err = op.WaitForExit(ctx, "op-attach-done")
	require.NoError(t, err)
	assert.Equal(t, 5, st.Code)
	_, err = op.Attach(ctx, "op-attach-nosuch")
	assert.ErrorIs(t, err, cellos.ErrNotTracked)
	half := filepath.Join(e.root, "op-attach-half")
	require.NoError(t, os.Mkdir(half, 0o700))
	_, err = op.Attach(ctx, "op-attach-half")
	assert.ErrorIs(t, err, cellos.ErrNotTracked)
	assert.DirExists(t, half)
	require.NoError(t, os.Remove(half))

	// The operator resumes the cell and leaves; the supervisor still owns it.
	require.NoError(t, op.Resume(ctx, h.CellID))
	require.NoError(t, e.b.Signal(ctx, h.CellID, syscall.SIGKILL))
	st, err = e.b.WaitForExit(ctx, h.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 137, Signal: 9, Reason: cellos.ExitSignaled}, st)
	st, err = op.WaitForExit(ctx, h.CellID)
	require.NoError(t, err)
	assert.Equal(t, 137, st.Code, "both backends see the same exit")
}

func TestOperateExecRightAfterCreate(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	// Create returns before the sandbox is up; the operations wait for it.
	h := e.create(sh("op-exec-early", "sleep 60"))
	st, out, _, err := e.execIn(h.CellID, argv("/bin/echo", "early"))
	require.NoError(t, err)
	assert.Equal(t, 0, st.Code)
	assert.Equal(t, "early\n", out)
	h2 := e.create(sh("op-stats-early", "sleep 60"))
	_, err = e.b.Stats(context.Background(), h2.CellID)
	require.NoError(t, err)
}

// A Checkpoint that races the workload's own exit 0 reports what happened: either the cell was
// saved (an image, and WaitForExit says checkpointed) or it exited first (Checkpoint's error
// wraps ErrCellExited and WaitForExit gives the exit) — never "checkpointed" to an empty image.
func TestOperateCheckpointRacingExit(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	outcomes := map[string]int{}
	for i, delay := range []string{"0.05", "0.1", "0.2", "0.3", "0.4", "0.6"} {
		id := fmt.Sprintf("op-ckpt-race-%d", i)
		image := filepath.Join(t.TempDir(), "image")
		h := e.create(sh(id, "echo up; sleep "+delay+"; exit 0"))
		e.waitOutput(h.CellID, hasLine("up"))
		cerr := e.b.Checkpoint(context.Background(), h.CellID, image)
		st, werr := e.b.WaitForExit(context.Background(), h.CellID)
		switch {
		case cerr == nil:
			outcomes["checkpointed"]++
			require.ErrorIs(t, werr, gvisor.ErrCheckpointed, "delay %s", delay)
			fi, err := os.Stat(filepath.Join(image, "checkpoint.img"))
			require.NoError(t, err, "a checkpoint reported without an image")
			assert.Positive(t, fi.Size())
		case errors.Is(cerr, gvisor.ErrCellExited):
			outcomes["exited"]++
			require.NoError(t, werr, "delay %s", delay)
			assert.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st)
		default:
			// runsc's own failure (the container went away under it): the exit still stands.
			outcomes["runsc failed"]++
			require.ErrorIs(t, cerr, cellos.ErrHost)
			require.NoError(t, werr, "a failed checkpoint hides the exit: %v", cerr)
			assert.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st)
		}
		e.destroy(h)
	}
	t.Logf("outcomes: %v", outcomes)
}
