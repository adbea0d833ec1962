package gvisor_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// newPoolEnv is a realEnv whose Backend keeps a warm pool of size sandboxes; Close runs at
// cleanup, after the test's cells are destroyed and before the check that nothing is left.
func newPoolEnv(t *testing.T, size int, opts ...gvisor.Option) *realEnv {
	t.Helper()
	e := newRealEnv(t, append([]gvisor.Option{gvisor.WithWarmPool(size)}, opts...)...)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		require.NoError(t, e.b.Close(ctx))
	})
	return e
}

// awaitIdle waits until the pool holds n idle sandboxes.
func (e *realEnv) awaitIdle(n int) {
	e.t.Helper()
	require.Eventually(e.t, func() bool { return e.b.PoolStats().Idle >= n }, 120*time.Second, 5*time.Millisecond,
		"pool: %+v", e.b.PoolStats())
}

// poolRecord is what a pooled cell's shim.json (the copy of its shim's request, for operators)
// says of its sandbox.
type poolRecord struct {
	RunscID string `json:"runscId"`
	Pool    bool   `json:"pool"`
}

func (e *realEnv) shimRecord(id string) poolRecord {
	e.t.Helper()
	data, err := os.ReadFile(filepath.Join(e.root, id, "shim.json"))
	require.NoError(e.t, err)
	var rec poolRecord
	require.NoError(e.t, json.Unmarshal(data, &rec))
	return rec
}

// pooled reports whether the cell runs (or ran) in a pool sandbox: its shim.json says so.
func (e *realEnv) pooled(id string) bool {
	e.t.Helper()
	return e.shimRecord(id).Pool
}

// createPooled creates d in a pool sandbox: it waits for one to be idle first.
func (e *realEnv) createPooled(d *cellos.ExecutionCellDocument) cellos.CellHandle {
	e.t.Helper()
	e.awaitIdle(1)
	h := e.create(d)
	require.True(e.t, e.pooled(d.Spec.ID), "cell %s did not start in a pool sandbox", d.Spec.ID)
	return h
}

// runPooled runs d in a pool sandbox and returns its status.
func (e *realEnv) runPooled(d *cellos.ExecutionCellDocument) (cellos.ExitStatus, error) {
	e.t.Helper()
	h := e.createPooled(d)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return e.b.WaitForExit(ctx, h.CellID)
}

// probePooled runs a shell script in a pool sandbox and returns its stdout; the cell must exit 0.
func (e *realEnv) probePooled(d *cellos.ExecutionCellDocument) string {
	e.t.Helper()
	st, err := e.runPooled(d)
	require.NoError(e.t, err)
	out := e.out(d.Spec.ID)
	require.Equal(e.t, cellos.ExitStatus{Reason: cellos.ExitExited}, st, "stdout: %s\nstderr: %s", out.stdout.String(), out.stderr.String())
	return out.stdout.String()
}

// cellLeftovers lists what of one (pooled) cell is still on the host: processes naming its
// bundle or its sandbox or working in its bundle (its keeper), runsc state of its sandbox, its
// bundle.
func (e *realEnv) cellLeftovers(id string, rec poolRecord) []string {
	var left []string
	bundle := filepath.Join(e.root, id)
	needles := [][]byte{[]byte(bundle + "\x00"), []byte(rec.RunscID)}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		if cwd, _ := os.Readlink(filepath.Join(filepath.Dir(p), "cwd")); cwd == bundle {
			left = append(left, "process "+strings.ReplaceAll(string(data), "\x00", " "))
			continue
		}
		for _, n := range needles {
			if bytes.Contains(data, n) {
				left = append(left, "process "+strings.ReplaceAll(string(data), "\x00", " "))
				break
			}
		}
	}
	state, _ := os.ReadDir(filepath.Join(e.root, ".runsc"))
	for _, s := range state {
		if strings.Contains(s.Name(), rec.RunscID) {
			left = append(left, "runsc state "+s.Name())
		}
	}
	if _, err := os.Lstat(filepath.Join(e.root, id)); err == nil {
		left = append(left, "bundle "+id)
	}
	return left
}

// keepers lists the pool keepers of the env's bundle root, idle or serving a cell.
func (e *realEnv) keepers() []int {
	var out []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		data, err := os.ReadFile(p)
		cwd, _ := os.Readlink(filepath.Join(filepath.Dir(p), "cwd"))
		if err == nil && string(data) == "cellos-gvisor-pool\x00" && strings.HasPrefix(cwd, e.root+"/") {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			out = append(out, pid)
		}
	}
	return out
}

// TestPoolIsolationSameAsCold runs the isolation probe of TestIsolationDefaults in a cold cell
// and in a pooled one. Everything is the same but the two documented differences: the hostname
// (the sandbox exists before the cell id) and pid 1 (the idle init; the workload is another
// process, of another uid, which it cannot signal — TestPoolIdleInitProtected).
func TestPoolIsolationSameAsCold(t *testing.T) {
	t.Parallel()
	cold := newRealEnv(t)
	e := newPoolEnv(t, 1)
	marker, err := os.CreateTemp("/tmp", "cellos-host-marker-*")
	require.NoError(t, err)
	marker.Close()
	t.Cleanup(func() { os.Remove(marker.Name()) })
	script := isolationProbeScript(marker.Name())
	coldOut := cold.probe(sh("iso-cold", script))
	poolOut := e.probePooled(sh("iso-pool", script))
	want, got := lines(coldOut), lines(poolOut)

	assert.Equal(t, "iso-cold", want["hostname"])
	assert.Equal(t, gvisor.WarmPoolHostname, got["hostname"], "a pooled cell's hostname")
	assert.Equal(t, "1", want["pid"])
	assert.NotEqual(t, "1", got["pid"], "in a pool sandbox, pid 1 is the idle init")
	procs, _ := strconv.Atoi(got["procs"])
	assert.LessOrEqual(t, procs, 7, "the cell's processes and the idle init:\n%s", poolOut)
	for _, k := range []string{"hostname", "pid", "procs"} {
		delete(want, k)
		delete(got, k)
	}
	assert.Equal(t, want, got, "pooled cell:\n%s\ncold cell:\n%s", poolOut, coldOut)
	// The values themselves, as TestIsolationDefaults checks them for cold cells.
	assert.Equal(t, "0000000000000000", got["caps"])
	assert.Equal(t, "0", got["ambient"])
	assert.Equal(t, "1", got["nnp"])
	assert.Contains(t, poolOut, "uid=65534 gid=65534 user=nobody")
	assert.Equal(t, "no", got["rootwrite"])
	assert.Equal(t, "tmpfs", got["tmpfs"])
	assert.Equal(t, "hidden", got["hostmarker"])
	assert.Equal(t, "lo", got["ifaces"])
	assert.Equal(t, "alternatives group hostname hosts ld.so.cache passwd resolv.conf", got["etc"])
	assert.Equal(t, "42", got["awk"])
}

func TestPoolUserWorkingDirEnv(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 1)
	d := sh("pool-user", `echo "$(id -u):$(id -g):$(id -un):$PWD:$GREETING:$PATH"; hostname; grep -c . /etc/hosts`)
	d.Spec.Run.User = &cellos.UserSpec{UID: 1000, GID: 1000}
	d.Spec.Run.WorkingDir = "/tmp"
	d.Spec.Run.Env = map[string]string{"GREETING": "hi"}
	assert.Equal(t, "1000:1000:cell:/tmp:hi:"+cellos.DefaultPath+"\ncell\n2\n", e.probePooled(d))
	// The environment of a cold cell: nothing of the idle init's (HOME comes from /etc/passwd).
	cold := newRealEnv(t)
	d = doc("pool-env", "/usr/bin/env")
	d.Spec.Run.Env = map[string]string{"A": "1"}
	want := strings.Split(cold.probe(d), "\n")
	assert.Contains(t, want, "A=1")
	// runsc exec does not keep the order of the variables (Debian's shuffles them).
	assert.ElementsMatch(t, want, strings.Split(e.probePooled(d), "\n"))
}

func TestPoolTmpNotShared(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 1)
	e.probePooled(sh("pool-tmp-a", "echo secret > /tmp/shared && cat /tmp/shared"))
	out := e.probePooled(sh("pool-tmp-b", "echo /tmp/* /tmp/.[!.]*; cat /tmp/shared 2>/dev/null || echo absent"))
	assert.Equal(t, "/tmp/* /tmp/.[!.]*\nabsent\n", out, "the new cell's /tmp is empty")
}

// TestPoolIdleInitProtected: the workload, whatever its user, cannot signal the idle init
// (another uid, no capabilities); a document asking for the init's uid starts cold.
func TestPoolIdleInitProtected(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 1, gvisor.WithAllowRoot(true)) // even root in the cell cannot kill the idle init
	script := `ps -o uid=,pid=,comm= -p 1 2>/dev/null || echo "$(cat /proc/1/comm)"; kill -KILL 1 2>/dev/null && echo killed || echo kill-refused; kill -STOP 1 2>/dev/null && echo stopped || echo stop-refused; grep State /proc/1/status`
	for _, uid := range []uint32{65534, 0, 1000} {
		d := sh(fmt.Sprintf("pool-init-%d", uid), script)
		d.Spec.Run.User = &cellos.UserSpec{UID: uid, GID: uid}
		out := e.probePooled(d)
		assert.Contains(t, out, "kill-refused\nstop-refused\n", "uid %d", uid)
		assert.Contains(t, out, "sleep", "uid %d", uid)
		assert.Regexp(t, `State:\s+S`, out, "uid %d: the idle init still sleeps", uid)
	}
	e.awaitIdle(1)
	d := sh("pool-init-uid", "id -u")
	d.Spec.Run.User = &cellos.UserSpec{UID: gvisor.WarmPoolIdleUID, GID: gvisor.WarmPoolIdleUID}
	out := e.probe(d)
	assert.Equal(t, strconv.Itoa(gvisor.WarmPoolIdleUID)+"\n", out)
	assert.False(t, e.pooled("pool-init-uid"), "the idle init's uid starts cold")
}

func TestPoolExitStatuses(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 2)
	for _, code := range []int{0, 7, 255} {
		st, err := e.runPooled(sh(fmt.Sprintf("pool-exit-%d", code), fmt.Sprintf("exit %d", code)))
		require.NoError(t, err)
		assert.Equal(t, cellos.ExitStatus{Code: code, Reason: cellos.ExitExited}, st)
	}
	st, err := e.runPooled(sh("pool-sigkill", "kill -KILL $$"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 137, Signal: 9, Reason: cellos.ExitSignaled}, st)
	st, err = e.runPooled(sh("pool-sigterm", "kill -TERM $$"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 143, Signal: 15, Reason: cellos.ExitSignaled}, st)
	// A workload that exits 128 is not a runsc failure; a binary that is not there is.
	st, err = e.runPooled(sh("pool-128", "exit 128"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 128, Reason: cellos.ExitExited}, st)
	_, err = e.runPooled(doc("pool-nobinary", "/bin/nothere"))
	require.Error(t, err)
	assert.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "/bin/nothere")
	assert.Contains(t, err.Error(), `"pool-nobinary"`)
	// Processes the workload leaves behind die with it, as in a cold cell.
	st, err = e.runPooled(sh("pool-orphan", "sleep 60 & echo started"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st)
	assert.Equal(t, "started\n", e.out("pool-orphan").stdout.String())
}

func TestPoolTTL(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 1)
	d := sh("pool-ttl", "echo up; sleep 30")
	d.Spec.Lifetime = &cellos.LifetimeSpec{TTLSeconds: 1}
	start := time.Now()
	st, err := e.runPooled(d)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 137, Signal: 9, Reason: cellos.ExitDeadlineExceeded}, st)
	assert.Less(t, time.Since(start), 15*time.Second)
	assert.Equal(t, "up\n", e.out("pool-ttl").stdout.String())
}

func TestPoolDestroyAndWaiters(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 1)
	h := e.createPooled(sh("pool-destroy", "echo started; sleep 60"))
	rec := e.shimRecord(h.CellID)
	require.NotNil(t, h.CgroupPath, "a pooled cell has its sandbox's cgroups, with the default limits")
	require.Equal(t, "/cellos/"+rec.RunscID, *h.CgroupPath)
	e.waitOutput(h.CellID, hasLine("started"))
	var wg sync.WaitGroup
	results := make([]cellos.ExitStatus, 4)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], _ = e.b.WaitForExit(context.Background(), h.CellID)
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err := e.b.WaitForExit(ctx, h.CellID)
	cancel()
	require.ErrorIs(t, err, context.DeadlineExceeded, "ctx ends the wait, not the cell")
	rep, err := e.b.Destroy(context.Background(), h)
	require.NoError(t, err)
	assert.Equal(t, cellos.TeardownReport{CellID: "pool-destroy", Destroyed: true}, rep)
	wg.Wait()
	for _, st := range results {
		assert.Equal(t, cellos.ExitDestroyed, st.Reason)
	}
	assert.Empty(t, e.cellLeftovers(h.CellID, rec))
	rep, err = e.b.Destroy(context.Background(), h)
	require.NoError(t, err)
	assert.True(t, rep.Destroyed, "idempotent")
	_, err = e.b.WaitForExit(context.Background(), h.CellID)
	assert.ErrorIs(t, err, cellos.ErrNotTracked)

	// An exited pooled cell: its sandbox is already gone; Destroy removes the bundle.
	st, err := e.runPooled(sh("pool-exited", "exit 4"))
	require.NoError(t, err)
	assert.Equal(t, 4, st.Code)
	rec = e.shimRecord("pool-exited")
	assert.Equal(t, []string{"bundle pool-exited"}, e.cellLeftovers("pool-exited", rec), "the sandbox went with the workload")
	e.destroy(cellos.CellHandle{CellID: "pool-exited"})
	assert.Empty(t, e.cellLeftovers("pool-exited", rec))
}

func TestPoolOutputIntact(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 1)
	d := doc("pool-bigout", "/usr/bin/python3", "-c", `
import sys
for i in range(16384):
    sys.stdout.write("%063d\n" % i)
sys.stdout.flush()
sys.stderr.write("to-stderr\n")
`)
	st, err := e.runPooled(d)
	require.NoError(t, err)
	require.Equal(t, cellos.ExitExited, st.Reason)
	var want bytes.Buffer
	for i := range 16384 {
		fmt.Fprintf(&want, "%063d\n", i)
	}
	file, err := os.ReadFile(filepath.Join(e.root, "pool-bigout", "stdout.log"))
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want.Bytes(), file), "stdout.log differs (len %d)", len(file))
	assert.True(t, bytes.Equal(want.Bytes(), []byte(e.out("pool-bigout").stdout.String())), "stdout writer differs")
	errFile, err := os.ReadFile(filepath.Join(e.root, "pool-bigout", "stderr.log"))
	require.NoError(t, err)
	assert.Equal(t, "to-stderr\n", string(errFile))
	assert.Equal(t, "to-stderr\n", e.out("pool-bigout").stderr.String())
}

// TestPoolProfile: only documents whose sandbox does not depend on them start in the pool.
func TestPoolProfile(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 1)
	e.awaitIdle(1)
	no := false
	cases := map[string]func(d *cellos.ExecutionCellDocument){
		"pool-cold-mount": func(d *cellos.ExecutionCellDocument) {
			d.Spec.Mounts = []cellos.MountSpec{{Type: cellos.MountTmpfs, Destination: "/scratch", ReadOnly: &no}}
		},
		"pool-cold-limits": func(d *cellos.ExecutionCellDocument) {
			d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 128 << 20}
		},
		"pool-cold-image": func(d *cellos.ExecutionCellDocument) {
			d.Spec.Rootfs = &cellos.RootfsSpec{Path: busyboxImage(t)}
		},
	}
	for id, change := range cases {
		d := sh(id, "echo ok")
		change(d)
		assert.Equal(t, "ok\n", e.probe(d), id)
		assert.False(t, e.pooled(id), "%s started in the pool", id)
	}
	assert.Equal(t, uint64(0), e.b.PoolStats().Pooled)
	assert.Equal(t, 1, e.b.PoolStats().Idle, "the idle sandbox is still there")
	// A TTL, labels and an empty network section change nothing of the sandbox.
	d := sh("pool-warm-ttl", "echo ok")
	d.Spec.Lifetime = &cellos.LifetimeSpec{TTLSeconds: 30}
	d.Spec.Labels = map[string]string{"team": "ci"}
	d.Spec.Network = &cellos.NetworkSpec{}
	assert.Equal(t, "ok\n", e.probePooled(d))
	cfg, err := os.ReadFile(filepath.Join(e.root, "pool-warm-ttl", "config.json"))
	require.NoError(t, err)
	assert.Contains(t, string(cfg), `"cellos.dev/label.team": "ci"`, "labels are in the bundle's config.json")
	assert.Contains(t, string(cfg), `"cellos.dev/cell-id": "pool-warm-ttl"`)
}

// TestPoolSurplusTakesColdPath: Creates that find the pool empty start cold at once; all succeed.
func TestPoolSurplusTakesColdPath(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 2)
	e.awaitIdle(2)
	const n = 8
	for _, err := range e.createAtOnce("pool-burst", n, 3, false) {
		assert.NoError(t, err)
	}
	pooled := 0
	for i := range n {
		if e.pooled(fmt.Sprintf("pool-burst-%d", i)) {
			pooled++
		}
		e.destroy(cellos.CellHandle{CellID: fmt.Sprintf("pool-burst-%d", i)})
	}
	st := e.b.PoolStats()
	assert.GreaterOrEqual(t, pooled, 2)
	assert.Equal(t, uint64(pooled), st.Pooled)
	assert.Equal(t, uint64(n-pooled), st.Cold)
	e.awaitIdle(2) // refilled
}

func TestPoolSignalExecStatsCheckpoint(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 1)
	d := sh("pool-ops", `trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done`)
	d.Spec.Run.User = &cellos.UserSpec{UID: 1000, GID: 1000}
	h := e.createPooled(d)
	e.waitOutput(h.CellID, hasLine("ready"))
	ctx := context.Background()

	st, out, _, err := e.execIn(h.CellID, argv("/bin/sh", "-c", "id -u; hostname"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st)
	assert.Equal(t, "1000\ncell\n", out, "Exec runs as the cell's user")
	stats, err := e.b.Stats(ctx, h.CellID)
	require.NoError(t, err)
	assert.NotZero(t, stats.MemoryBytes)
	require.NoError(t, e.b.Pause(ctx, h.CellID))
	require.NoError(t, e.b.Resume(ctx, h.CellID))
	err = e.b.Checkpoint(ctx, h.CellID, t.TempDir())
	assert.ErrorIs(t, err, cellos.ErrUnsupported)

	// Signal reaches the workload, not the sandbox's idle init.
	require.NoError(t, e.b.Signal(ctx, h.CellID, syscall.SIGTERM))
	st, err = e.b.WaitForExit(ctx, h.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 42, Reason: cellos.ExitExited}, st)
	assert.Equal(t, "ready\ngot TERM\n", e.out(h.CellID).stdout.String())

	h2 := e.createPooled(sh("pool-sig-plain", "echo ready; sleep 60"))
	e.waitOutput(h2.CellID, hasLine("ready"))
	require.NoError(t, e.b.Signal(ctx, h2.CellID, syscall.SIGTERM))
	st, err = e.b.WaitForExit(ctx, h2.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 143, Signal: 15, Reason: cellos.ExitSignaled}, st)
}

// TestPoolClose: Close deletes every idle sandbox and leaves cells alone; nothing of the pool
// is left; later Creates start cold.
func TestPoolClose(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 3)
	h := e.createPooled(sh("pool-survivor", `trap 'echo still; exit 6' TERM; echo up; while :; do sleep 0.1; done`))
	e.awaitIdle(3)
	require.Len(t, e.keepers(), 4, "three idle keepers and the cell's")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	require.NoError(t, e.b.Close(ctx))
	require.NoError(t, e.b.Close(ctx), "idempotent")
	st := e.b.PoolStats()
	assert.True(t, st.Closed)
	assert.Zero(t, st.Idle)

	_, err := os.Lstat(filepath.Join(e.root, ".pool"))
	assert.ErrorIs(t, err, os.ErrNotExist, "the pool directory is gone")
	assert.Len(t, e.keepers(), 1, "only the cell's keeper")
	state, _ := os.ReadDir(filepath.Join(e.root, ".runsc"))
	rec := e.shimRecord(h.CellID)
	for _, s := range state {
		if s.Name() != "null-netns" { // current runsc's, shared while the cell runs
			assert.Contains(t, s.Name(), rec.RunscID, "runsc state of an idle sandbox left")
		}
	}
	// The cell goes on.
	e.waitOutput(h.CellID, hasLine("up"))
	require.NoError(t, e.b.Signal(context.Background(), h.CellID, syscall.SIGTERM))
	st2, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 6, Reason: cellos.ExitExited}, st2)
	assert.Equal(t, "up\nstill\n", e.out(h.CellID).stdout.String())

	h2 := e.create(sh("pool-after-close", "echo cold"))
	_, err = e.b.WaitForExit(context.Background(), h2.CellID)
	require.NoError(t, err)
	assert.False(t, e.pooled(h2.CellID))
	e.destroy(h)
	e.destroy(h2)
	assert.Empty(t, e.leftovers())
}

// TestPoolRecoverLeavesOwnPool: Recover on a Backend with a pool removes none of its own idle
// sandboxes and lists none of them.
func TestPoolRecoverLeavesOwnPool(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 2)
	e.awaitIdle(2)
	rep, err := e.b.Recover(context.Background())
	require.NoError(t, err)
	assert.Empty(t, rep.Adopted)
	assert.Empty(t, rep.Cleaned)
	assert.Equal(t, 2, e.b.PoolStats().Idle)
	list, err := e.b.List(context.Background())
	require.NoError(t, err)
	assert.Empty(t, list, "idle sandboxes are not cells")
	e.probePooled(sh("pool-after-recover", "true"))
}

// The supervisor of the pool crash test is this test binary, re-executed: TestHelperPoolSupervisor
// does the work when CELLOS_TEST_POOL_ROOT is set, and is a no-op otherwise.
const poolSupervisorEnv = "CELLOS_TEST_POOL_ROOT"

func TestHelperPoolSupervisor(t *testing.T) {
	root := os.Getenv(poolSupervisorEnv)
	if root == "" {
		return
	}
	fail := func(err error) {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	b, err := gvisor.New(gvisor.WithBundleRoot(root), gvisor.WithWarmPool(2))
	if err != nil {
		fail(err)
	}
	ctx := context.Background()
	awaitIdle := func(n int) {
		for deadline := time.Now().Add(120 * time.Second); b.PoolStats().Idle < n; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				fail(fmt.Errorf("pool not refilled: %+v", b.PoolStats()))
			}
		}
	}
	for _, c := range []struct{ id, script string }{
		{"pquick", "echo quick; exit 5"},
		{"plater", "echo before; sleep 3; echo after; exit 3"},
		{"plong", "echo long; sleep 120"},
	} {
		awaitIdle(1)
		if _, err := b.Create(ctx, sh(c.id, c.script)); err != nil {
			fail(err)
		}
	}
	if st := b.PoolStats(); st.Pooled != 3 {
		fail(fmt.Errorf("cells did not start in the pool: %+v", st))
	}
	if _, err := b.WaitForExit(ctx, "pquick"); err != nil {
		fail(err)
	}
	awaitIdle(2)
	fmt.Println("ready")
	select {} // until killed
}

func TestPoolCrashSupervisorKilledThenRecover(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperPoolSupervisor$", "-test.count=1")
	cmd.Env = append(os.Environ(), poolSupervisorEnv+"="+e.root)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr syncBuffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	line, _ := bufio.NewReader(out).ReadString('\n')
	require.Equal(t, "ready\n", line, "supervisor stderr: %s", stderr.String())

	idle, err := os.ReadDir(filepath.Join(e.root, ".pool"))
	require.NoError(t, err)
	require.Len(t, idle, 2)
	// One idle keeper dies with the supervisor (killed too: it can delete nothing), the other
	// sees its supervisor gone and deletes its sandbox; Recover removes what is left of both.
	victim := shimOf(filepath.Join(e.root, ".pool", idle[0].Name()))
	require.NotZero(t, victim, "the idle keeper works in its pool directory")
	require.NoError(t, syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL))
	require.NoError(t, syscall.Kill(victim, syscall.SIGKILL))
	_ = cmd.Wait()

	// The pooled cells went on without their supervisor.
	require.Eventually(t, func() bool {
		data, _ := os.ReadFile(filepath.Join(e.root, "plater", "stdout.log"))
		return string(data) == "before\nafter\n"
	}, 20*time.Second, 20*time.Millisecond, "output after the supervisor died")

	rep, err := e.b.Recover(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []string{"plater", "plong", "pquick"}, rep.Adopted)
	assert.Empty(t, rep.Cleaned, "idle pool sandboxes are not cells")
	_, err = os.Lstat(filepath.Join(e.root, ".pool"))
	assert.ErrorIs(t, err, os.ErrNotExist, "the idle sandboxes are gone")
	st, err := e.b.WaitForExit(context.Background(), "pquick")
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 5, Reason: cellos.ExitExited}, st)
	st, err = e.b.WaitForExit(context.Background(), "plater")
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 3, Reason: cellos.ExitExited}, st)
	assert.Equal(t, "before\nafter\n", e.out("plater").stdout.String(), "adopted cells' output from the start")
	// The exited pooled cells' keepers and sandboxes went with them (their WaitForExit includes
	// that), the idle ones with Recover: only the long cell's are left.
	assert.Len(t, e.keepers(), 1, "only the long cell's keeper runs")
	state, _ := os.ReadDir(filepath.Join(e.root, ".runsc"))
	long := e.shimRecord("plong")
	for _, s := range state {
		if s.Name() != "null-netns" { // current runsc's, shared while the cell runs
			assert.Contains(t, s.Name(), long.RunscID, "runsc state of an idle sandbox left")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = e.b.WaitForExit(ctx, "plong")
	require.ErrorIs(t, err, context.DeadlineExceeded, "the long cell still runs")
	require.NoError(t, e.b.Signal(context.Background(), "plong", syscall.SIGTERM))
	st, err = e.b.WaitForExit(context.Background(), "plong")
	require.NoError(t, err)
	assert.Equal(t, 143, st.Code)
	for _, id := range rep.Adopted {
		e.destroy(cellos.CellHandle{CellID: id})
	}
	assert.Empty(t, e.leftovers())
	rep, err = e.b.Recover(context.Background())
	require.NoError(t, err)
	assert.Empty(t, rep.Adopted)
	assert.Empty(t, rep.Cleaned)
}

func TestWithWarmPoolSize(t *testing.T) {
	for _, n := range []int{-1, gvisor.MaxWarmPool + 1} {
		_, err := gvisor.New(gvisor.WithWarmPool(n))
		assert.Error(t, err, "size %d", n)
	}
	b, err := gvisor.New(gvisor.WithWarmPool(0))
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	assert.Equal(t, gvisor.PoolStats{}, b.PoolStats())
	assert.NoError(t, b.Close(context.Background()), "Close without a pool")
}

// TestPoolFollowsRunscChange: idle sandboxes of another runsc are not used; they are replaced by
// ones of the runsc Create now uses. Not parallel: it changes the environment.
func TestPoolFollowsRunscChange(t *testing.T) {
	debian, err := exec.LookPath("runsc")
	if err != nil {
		t.Skip("needs Debian's runsc and the current one")
	}
	current, _ := filepath.Abs(".cache/runsc-current/runsc")
	if _, err := os.Stat(current); err != nil {
		t.Skip("needs the current runsc (make runsc-current)")
	}
	from, to := debian, current
	if os.Getenv(gvisor.EnvRunscBin) == current {
		from, to = current, debian
	}
	t.Setenv(gvisor.EnvRunscBin, from)
	e := newPoolEnv(t, 1)
	e.awaitIdle(1)
	t.Setenv(gvisor.EnvRunscBin, to)
	e.probe(sh("pool-switch-cold", "true"))
	assert.False(t, e.pooled("pool-switch-cold"), "a sandbox of the other runsc was used")
	out := e.probePooled(sh("pool-switch-warm", "true"))
	assert.Empty(t, out)
	data, err := os.ReadFile(filepath.Join(e.root, "pool-switch-warm", "shim.json"))
	require.NoError(t, err)
	assert.Contains(t, string(data), `"Path": "`+to+`"`)
}
