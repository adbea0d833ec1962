package gvisor_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/testkit"
)

// requireRunsc skips a test that needs the real runsc when it is absent, unless
// CELLOS_REQUIRE_RUNSC=1 (set by CI and `make test`), which turns the skip into a failure.
// The runsc they use is the library's: $CELLOS_GVISOR_RUNSC_BIN, else runsc on $PATH.
func requireRunsc(t testing.TB) string { return testkit.Runsc(t) }

// TestMain keeps an operator's bundle root override away from the tests: each test uses a
// private root of its own.
func TestMain(m *testing.M) {
	os.Unsetenv(gvisor.EnvBundleRoot)
	os.Unsetenv(gvisor.EnvImageStore)
	os.Exit(m.Run())
}

// realEnv is a backend on a private bundle root with the real runsc.
type realEnv struct {
	t    testing.TB
	root string
	b    *gvisor.Backend
	mu   sync.Mutex
	outs map[string]*outPair
}

type outPair struct{ stdout, stderr syncBuffer }

type syncBuffer = testkit.Buffer

func newRealEnv(t testing.TB, opts ...gvisor.Option) *realEnv {
	t.Helper()
	requireRunsc(t)
	e := &realEnv{t: t, root: t.TempDir(), outs: map[string]*outPair{}}
	opts = append([]gvisor.Option{
		gvisor.WithBundleRoot(e.root),
		gvisor.WithLogger(zaptest.NewLogger(t)),
		gvisor.WithOutput(func(id string) (io.Writer, io.Writer) {
			e.mu.Lock()
			defer e.mu.Unlock()
			p := &outPair{}
			e.outs[id] = p
			return &p.stdout, &p.stderr
		}),
	}, opts...)
	b, err := gvisor.New(opts...)
	require.NoError(t, err)
	e.b = b
	t.Cleanup(func() { e.assertNothingLeft() })
	t.Cleanup(func() { _ = b.Close(context.Background()) }) // runs first: the spare shim goes
	return e
}

func (e *realEnv) out(id string) *outPair {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.outs[id]
}

func doc(id string, argv ...string) *cellos.ExecutionCellDocument {
	return &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
		Spec: cellos.CellSpec{ID: id, Run: cellos.RunSpec{Argv: argv}}}
}

func sh(id, script string) *cellos.ExecutionCellDocument { return doc(id, "/bin/sh", "-c", script) }

// run creates the cell, waits for it, and returns its status; the cell is destroyed at cleanup.
func (e *realEnv) run(d *cellos.ExecutionCellDocument) (cellos.ExitStatus, error) {
	e.t.Helper()
	h := e.create(d)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := e.b.WaitForExit(ctx, h.CellID)
	return st, err
}

func (e *realEnv) create(d *cellos.ExecutionCellDocument) cellos.CellHandle {
	e.t.Helper()
	h, err := e.b.Create(context.Background(), d)
	require.NoError(e.t, err)
	e.t.Cleanup(func() { e.destroy(h) })
	return h
}

func (e *realEnv) destroy(h cellos.CellHandle) cellos.TeardownReport {
	e.t.Helper()
	rep, err := e.b.Destroy(context.Background(), h)
	require.NoError(e.t, err)
	require.True(e.t, rep.Destroyed, "teardown report %+v", rep)
	return rep
}

// leftovers lists what of this env's cells is still on the host: processes whose command line
// names the bundle root or whose working directory is in it (a spare shim serving a cell), runsc
// state files, bundle directories and cgroups.
func (e *realEnv) leftovers() []string {
	var left []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		cwd, _ := os.Readlink(filepath.Join(filepath.Dir(p), "cwd"))
		if !bytes.Contains(data, []byte(e.root)) && !strings.HasPrefix(cwd, e.root+"/") {
			continue
		}
		left = append(left, "process "+filepath.Base(filepath.Dir(p))+": "+strings.ReplaceAll(string(data), "\x00", " "))
	}
	state, _ := os.ReadDir(filepath.Join(e.root, ".runsc"))
	for _, s := range state {
		left = append(left, "runsc state "+s.Name())
	}
	entries, _ := os.ReadDir(e.root)
	for _, en := range entries {
		if en.Name() != ".runsc" {
			left = append(left, "bundle "+en.Name())
		}
	}
	return left
}

func (e *realEnv) assertNothingLeft() {
	e.t.Helper()
	require.Eventually(e.t, func() bool { return len(e.leftovers()) == 0 }, 10*time.Second, 50*time.Millisecond,
		"left behind: %v", e.leftovers())
}

// cgroupDirs lists the cgroup directories of cell id of this env's root in every hierarchy: they
// are named after its runsc id.
func (e *realEnv) cgroupDirs(id string) []string {
	return cgroupDirsNamed(gvisor.RunscID(e.root, id))
}

// cgroupDirsNamed lists the cgroup directories called name under the library's parent.
func cgroupDirsNamed(id string) []string {
	var out []string
	for _, pattern := range []string{"/sys/fs/cgroup/*/cellos/" + id, "/sys/fs/cgroup/cellos/" + id} {
		m, _ := filepath.Glob(pattern)
		out = append(out, m...)
	}
	return out
}

func TestRealExitCodes(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	for _, code := range []int{0, 7, 255} {
		st, err := e.run(sh(fmt.Sprintf("exit-%d", code), fmt.Sprintf("exit %d", code)))
		require.NoError(t, err)
		assert.Equal(t, cellos.ExitStatus{Code: code, Reason: cellos.ExitExited}, st)
	}
}

func TestRealSignalDeath(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	st, err := e.run(sh("sigkill", "kill -KILL $$"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 137, Signal: 9, Reason: cellos.ExitSignaled}, st)
	st, err = e.run(sh("sigterm", "kill -TERM $$"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 143, Signal: 15, Reason: cellos.ExitSignaled}, st)
}

func TestRealOutputIntact(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	// 1 MiB of numbered lines on stdout, a different marker on stderr.
	d := doc("bigout", "/usr/bin/python3", "-c", `
import sys
for i in range(16384):
    sys.stdout.write("%063d\n" % i)
sys.stdout.flush()
sys.stderr.write("to-stderr\n")
`)
	st, err := e.run(d)
	require.NoError(t, err)
	require.Equal(t, cellos.ExitExited, st.Reason)
	var want bytes.Buffer
	for i := range 16384 {
		fmt.Fprintf(&want, "%063d\n", i)
	}
	require.Equal(t, 1<<20, want.Len())
	file, err := os.ReadFile(filepath.Join(e.root, "bigout", "stdout.log"))
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want.Bytes(), file), "stdout.log differs (len %d)", len(file))
	assert.True(t, bytes.Equal(want.Bytes(), []byte(e.out("bigout").stdout.String())), "stdout writer differs (len %d)", e.out("bigout").stdout.Len())
	errFile, err := os.ReadFile(filepath.Join(e.root, "bigout", "stderr.log"))
	require.NoError(t, err)
	assert.Equal(t, "to-stderr\n", string(errFile))
	assert.Equal(t, "to-stderr\n", e.out("bigout").stderr.String())
}

func TestRealTTL(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	d := sh("ttl", "sleep 30")
	d.Spec.Lifetime = &cellos.LifetimeSpec{TTLSeconds: 1}
	start := time.Now()
	st, err := e.run(d)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 137, Signal: 9, Reason: cellos.ExitDeadlineExceeded}, st)
	assert.Less(t, time.Since(start), 30*time.Second) // TTL 1 s; generous for a loaded 2-core machine
}

func TestRealRunscFailure(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	_, err := e.run(doc("nobinary", "/bin/nothere"))
	require.Error(t, err)
	assert.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "/bin/nothere")
	assert.Contains(t, err.Error(), `"nobinary"`)
}

func TestRealConcurrentWaiters(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	h := e.create(sh("waiters", "sleep 0.5; exit 3"))
	var wg sync.WaitGroup
	results := make([]cellos.ExitStatus, 8)
	errs := make([]error, 8)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = e.b.WaitForExit(context.Background(), h.CellID)
		}()
	}
	wg.Wait()
	for i := range results {
		require.NoError(t, errs[i])
		assert.Equal(t, cellos.ExitStatus{Code: 3, Reason: cellos.ExitExited}, results[i])
	}
	// Late callers get the same status until Destroy.
	st, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	assert.Equal(t, 3, st.Code)
	e.destroy(h)
	_, err = e.b.WaitForExit(context.Background(), h.CellID)
	assert.ErrorIs(t, err, cellos.ErrNotTracked)
}

func TestRealCancelledWaitLeavesCellRunning(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	createCtx, cancelCreate := context.WithCancel(context.Background())
	h, err := e.b.Create(createCtx, sh("cancel", "sleep 1; echo survived"))
	require.NoError(t, err)
	t.Cleanup(func() { e.destroy(h) })
	cancelCreate() // Create's ctx does not own the cell
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = e.b.WaitForExit(ctx, h.CellID)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	st, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 0, Reason: cellos.ExitExited}, st)
	assert.Equal(t, "survived\n", e.out("cancel").stdout.String())
}

func TestRealDestroyRunningLeavesNothing(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	d := sh("destroy-me", "echo started; sleep 60")
	d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 256 << 20}
	h, err := e.b.Create(context.Background(), d)
	require.NoError(t, err)
	require.NotNil(t, h.CgroupPath)
	assert.Equal(t, "/cellos/"+gvisor.RunscID(e.root, "destroy-me"), *h.CgroupPath)
	require.Eventually(t, func() bool { return e.out("destroy-me").stdout.String() == "started\n" }, 10*time.Second, 10*time.Millisecond)
	assert.NotEmpty(t, e.cgroupDirs("destroy-me"))
	waited := make(chan cellos.ExitStatus, 1)
	go func() {
		st, _ := e.b.WaitForExit(context.Background(), h.CellID)
		waited <- st
	}()
	rep, err := e.b.Destroy(context.Background(), h)
	require.NoError(t, err)
	assert.Equal(t, cellos.TeardownReport{CellID: "destroy-me", Destroyed: true, PeersTrackedAfter: 0}, rep)
	assert.Equal(t, cellos.ExitDestroyed, (<-waited).Reason)
	assert.Empty(t, e.leftovers())
	assert.Empty(t, e.cgroupDirs("destroy-me"))
	// Idempotent.
	rep, err = e.b.Destroy(context.Background(), h)
	require.NoError(t, err)
	assert.True(t, rep.Destroyed)
}

func TestRealDuplicateAndBadIDs(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	e.create(sh("dup", "sleep 5"))
	_, err := e.b.Create(context.Background(), sh("dup", "true"))
	assert.ErrorIs(t, err, cellos.ErrAlreadyExists)
	for _, id := range []string{"../x", "a/b", "-x", strings.Repeat("a", 65), ""} {
		_, err := e.b.Create(context.Background(), sh(id, "true"))
		assert.ErrorIs(t, err, cellos.ErrInvalidSpec, "id %q", id)
		assert.Contains(t, err.Error(), "spec.id")
	}
	entries, _ := os.ReadDir(e.root)
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	assert.ElementsMatch(t, []string{".runsc", "dup"}, names)
	_, err = os.Stat(filepath.Join(filepath.Dir(e.root), "x"))
	assert.True(t, errors.Is(err, os.ErrNotExist))
}

func TestRealRunscMissing(t *testing.T) {
	requireRunsc(t)
	root := t.TempDir()
	t.Setenv(gvisor.EnvRunscBin, "/nonexistent/runsc")
	b, err := gvisor.New(gvisor.WithBundleRoot(root))
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	_, err = b.Create(context.Background(), sh("norunsc", "true"))
	require.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "/nonexistent/runsc")
	entries, _ := os.ReadDir(root)
	assert.Empty(t, entries)
}

func TestRealThirtyCellsAtOnce(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	for _, err := range e.createAtOnce("many", 30, 5, true) {
		assert.NoError(t, err)
	}
}

// createAtOnce creates n cells at once, <prefix>-<i> printing "cell <i>" and exiting with i%mod,
// waits for each and checks its status and output; destroy destroys each after its check.
func (e *realEnv) createAtOnce(prefix string, n, mod int, destroy bool) []error {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("%s-%d", prefix, i)
			h, err := e.b.Create(context.Background(), sh(id, fmt.Sprintf("echo cell %d; exit %d", i, i%mod)))
			if err != nil {
				errs <- err
				return
			}
			st, err := e.b.WaitForExit(context.Background(), h.CellID)
			if err == nil && (st.Code != i%mod || st.Reason != cellos.ExitExited) {
				err = fmt.Errorf("%s: status %+v", id, st)
			}
			if err == nil && e.out(id).stdout.String() != fmt.Sprintf("cell %d\n", i) {
				err = fmt.Errorf("%s: output %q", id, e.out(id).stdout.String())
			}
			if destroy {
				if _, derr := e.b.Destroy(context.Background(), h); err == nil {
					err = derr
				}
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	var out []error
	for err := range errs {
		out = append(out, err)
	}
	return out
}
