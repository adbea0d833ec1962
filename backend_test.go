package gvisor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/shim"
	"github.com/cellos/cellos-host-gvisor/internal/testkit"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// These tests run the backend against testdata/fake-runsc (see its header), selected through
// CELLOS_GVISOR_RUNSC_BIN; the shim is this test binary, re-executed as in production. They
// set environment variables, so none of them runs in parallel.

// fakeVars are the variables that steer the fake; each test starts with all of them empty.
var fakeVars = []string{"FAKE_RUNSC_MODE", "FAKE_RUNSC_EXIT", "FAKE_RUNSC_STDOUT", "FAKE_RUNSC_STDERR",
	"FAKE_RUNSC_STDOUT_BYTES", "FAKE_RUNSC_SLEEP", "FAKE_RUNSC_MSG", "FAKE_RUNSC_HANG_DELETE", "FAKE_RUNSC_KILL_FAILS"}

// fakeEnv is a backend on a private bundle root with the fake runsc.
type fakeEnv struct {
	t    *testing.T
	dir  string // the test's scratch directory; the bpath root and the fake's log are inside
	root string // the bpath root
	log  string // the fake's invocation log
	bin  string // the fake
	b    *Backend

	mu   sync.Mutex
	outs map[string]*fakeOutput
}

// fakeOutput is what WithOutput received for one cell.
type fakeOutput struct{ stdout, stderr fakeBuffer }

type fakeBuffer = testkit.Buffer

// fakeSetup points the library at the fake and a fresh bundle root (which does not exist yet)
// and checks at cleanup that nothing of the test's cells is left.
func fakeSetup(t *testing.T, opts ...Option) *fakeEnv {
	t.Helper()
	bin, err := filepath.Abs(filepath.Join("testdata", "fake-runsc"))
	require.NoError(t, err)
	dir := t.TempDir()
	e := &fakeEnv{t: t, dir: dir, root: filepath.Join(dir, "cells"), log: filepath.Join(dir, "runsc-calls.log"),
		bin: bin, outs: map[string]*fakeOutput{}}
	t.Setenv(EnvRunscBin, bin)
	t.Setenv(EnvBundleRoot, e.root)
	t.Setenv("FAKE_RUNSC_LOG", e.log)
	for _, v := range fakeVars {
		t.Setenv(v, "")
	}
	t.Cleanup(e.requireNothingLeft) // runs after the cells' own cleanups
	e.b = e.newBackend(opts...)
	return e
}

func (e *fakeEnv) newBackend(opts ...Option) *Backend {
	e.t.Helper()
	// No default limits: the fake's cells are about runsc's command lines and exit paths; the
	// limits a real cell gets by default are TestFakeDefaultLimits' subject.
	b, err := New(append([]Option{WithLogger(zaptest.NewLogger(e.t)), WithOutput(e.output), WithDefaultResources(DefaultResources{})}, opts...)...)
	require.NoError(e.t, err)
	e.t.Cleanup(func() { _ = b.Close(context.Background()) }) // its spare shim; before requireNothingLeft
	return b
}

func (e *fakeEnv) output(id string) (io.Writer, io.Writer) {
	e.mu.Lock()
	defer e.mu.Unlock()
	o := &fakeOutput{}
	e.outs[id] = o
	return &o.stdout, &o.stderr
}

func (e *fakeEnv) out(id string) *fakeOutput {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.outs[id]
}

// set sets environment variables (name, value, name, value...) for the rest of the test.
func (e *fakeEnv) set(t *testing.T, kv ...string) {
	t.Helper()
	for i := 0; i+1 < len(kv); i += 2 {
		t.Setenv(kv[i], kv[i+1])
	}
}

func fakeDoc(id string) *cellos.ExecutionCellDocument {
	return &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
		Spec: cellos.CellSpec{ID: id, Run: cellos.RunSpec{Argv: []string{"/bin/true"}}}}
}

// create creates the cell and destroys it at cleanup (a no-op when the test did already).
func (e *fakeEnv) create(d *cellos.ExecutionCellDocument) cellos.CellHandle {
	e.t.Helper()
	h, err := e.b.Create(context.Background(), d)
	require.NoError(e.t, err)
	require.Equal(e.t, d.Spec.ID, h.CellID)
	b := e.b
	e.t.Cleanup(func() {
		rep, err := b.Destroy(context.Background(), h)
		require.NoError(e.t, err)
		require.True(e.t, rep.Destroyed, "%+v", rep)
	})
	return h
}

func (e *fakeEnv) wait(id string) (cellos.ExitStatus, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return e.b.WaitForExit(ctx, id)
}

func (e *fakeEnv) destroy(id string) cellos.TeardownReport {
	e.t.Helper()
	rep, err := e.b.Destroy(context.Background(), cellos.CellHandle{CellID: id})
	require.NoError(e.t, err)
	require.True(e.t, rep.Destroyed, "%+v", rep)
	require.Equal(e.t, id, rep.CellID)
	return rep
}

func (e *fakeEnv) bundle(id string) string { return filepath.Join(e.root, id) }
func (e *fakeEnv) state() string           { return filepath.Join(e.root, ".runsc") }
func (e *fakeEnv) runscID(id string) string {
	return RunscID(e.root, id)
}

// stateFile is where the fake keeps the state of a cell's container.
func (e *fakeEnv) stateFile(id string) string {
	return filepath.Join(e.state(), e.runscID(id)+".state")
}

// awaitWorkload waits until the fake runs the cell's workload and returns its pid.
func (e *fakeEnv) awaitWorkload(id string) int {
	e.t.Helper()
	var pid int
	require.Eventually(e.t, func() bool {
		data, err := os.ReadFile(e.stateFile(id))
		if err != nil {
			return false
		}
		pid, _ = strconv.Atoi(strings.TrimSpace(string(data)))
		return pid > 0
	}, 10*time.Second, 5*time.Millisecond, "the fake never started the workload of %s", id)
	require.True(e.t, fakeAlive(pid))
	return pid
}

func (e *fakeEnv) shimPid(id string) int {
	e.t.Helper()
	var rec pidRecord
	require.NoError(e.t, readJSON(filepath.Join(e.bundle(id), bundle.ShimPid), &rec))
	require.Positive(e.t, rec.Pid)
	return rec.Pid
}

// fakeCall is one invocation of the fake.
type fakeCall struct {
	Pid  int
	Args []string
}

// sub returns the subcommand and its arguments, after the global flags.
func (c fakeCall) sub() (string, []string) {
	for i := 0; i < len(c.Args); i++ {
		switch a := c.Args[i]; {
		case a == "--root" || a == "--log":
			i++
		case strings.HasPrefix(a, "-"):
		default:
			return a, c.Args[i+1:]
		}
	}
	return "", nil
}

// calls lists the fake's invocations so far; with sub, only those of that subcommand.
func (e *fakeEnv) calls(sub string) []fakeCall {
	e.t.Helper()
	data, err := os.ReadFile(e.log)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	require.NoError(e.t, err)
	var out []fakeCall
	for _, line := range strings.Split(strings.TrimSuffix(string(data), "\n"), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Split(line, "\t")
		pid, err := strconv.Atoi(fields[0])
		require.NoError(e.t, err, "log line %q", line)
		c := fakeCall{Pid: pid, Args: fields[1:]}
		if s, _ := c.sub(); sub == "" || s == sub {
			out = append(out, c)
		}
	}
	return out
}

// runInfo lists the "#run" lines: how each `run` found its stdin and working directory.
func (e *fakeEnv) runInfo() [][]string {
	data, _ := os.ReadFile(e.log)
	var out [][]string
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "#run\t"); ok {
			out = append(out, strings.Split(rest, "\t"))
		}
	}
	return out
}

// hasCall reports whether the fake was invoked with exactly these subcommand arguments.
func (e *fakeEnv) hasCall(sub string, args ...string) bool {
	for _, c := range e.calls(sub) {
		if _, a := c.sub(); fmt.Sprint(a) == fmt.Sprint(args) {
			return true
		}
	}
	return false
}

// fakeAlive reports whether pid exists and is not a zombie.
func fakeAlive(pid int) bool {
	st, ok := fakeStat(pid)
	return ok && st.state != "Z" && st.state != "X"
}

type fakeProcStat struct {
	state string
	ppid  int
}

func fakeStat(pid int) (fakeProcStat, bool) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return fakeProcStat{}, false
	}
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return fakeProcStat{}, false
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 2 {
		return fakeProcStat{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	return fakeProcStat{state: f[0], ppid: ppid}, true
}

// leftovers lists what of this test's cells is still on the host: processes that inherited the
// test's fake log variable (shims, the fake, its workloads), shims whose command line names the
// test's directory, unreaped children, bundles, and runsc state.
func (e *fakeEnv) leftovers() []string {
	var left []string
	self := os.Getpid()
	marker := []byte("\x00FAKE_RUNSC_LOG=" + e.log + "\x00")
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(p))
		if err != nil || pid == self {
			continue
		}
		cmdline, _ := os.ReadFile(p + "/cmdline")
		environ, _ := os.ReadFile(p + "/environ")
		desc := fmt.Sprintf("process %d (%s)", pid, strings.ReplaceAll(string(cmdline), "\x00", " "))
		switch {
		case bytes.Contains(append([]byte{0}, environ...), marker):
			left = append(left, desc)
		case bytes.HasPrefix(cmdline, []byte(shim.Argv0+"\x00")) && bytes.Contains(cmdline, []byte(e.dir)):
			left = append(left, desc)
		default:
			if st, ok := fakeStat(pid); ok && st.ppid == self && st.state == "Z" {
				left = append(left, desc+" unreaped")
			}
		}
	}
	entries, _ := os.ReadDir(e.root)
	for _, en := range entries {
		if en.Name() != ".runsc" {
			left = append(left, "bundle root entry "+en.Name())
		}
	}
	state, _ := os.ReadDir(e.state())
	for _, s := range state {
		left = append(left, "runsc state "+s.Name())
	}
	return left
}

func (e *fakeEnv) requireNothingLeft() {
	e.t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		left := e.leftovers()
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Errorf("left behind: %v", left)
			return
		}
	}
}

// fakeRequireGone checks that a process no longer exists, not even as a zombie.
func fakeRequireGone(t *testing.T, pid int, what string) {
	t.Helper()
	_, err := os.Stat("/proc/" + strconv.Itoa(pid))
	require.ErrorIs(t, err, os.ErrNotExist, "%s (pid %d) still exists", what, pid)
}

func TestFakeRunArgv(t *testing.T) {
	e := fakeSetup(t)
	const id = "argv-1"
	h := e.create(fakeDoc(id))
	st, err := e.wait(id)
	require.NoError(t, err)
	require.Equal(t, cellos.ExitStatus{Code: 0, Reason: cellos.ExitExited}, st)

	bpath := e.bundle(id)
	runs := e.calls("run")
	require.Len(t, runs, 1)
	want := []string{"--root", e.state(), "--log", filepath.Join(bpath, "runsc.log"), "--log-format=json"}
	if os.Geteuid() != 0 {
		want = append(want, "--rootless")
	}
	want = append(want, "--network=none", "--ignore-cgroups", "--overlay2=none", "run", "--bundle", bpath, RunscID(e.root, id))
	require.Equal(t, want, runs[0].Args)
	require.Equal(t, [][]string{{"stdin=/dev/null", "cwd=" + bpath}}, e.runInfo())
	for _, f := range []string{bundle.Config, bundle.Stdout, bundle.Stderr, bundle.RunscLog, bundle.Exit, bundle.Rootfs} {
		_, err := os.Stat(filepath.Join(bpath, f))
		require.NoError(t, err)
	}
	require.Len(t, e.calls(""), 1, "a cell that ran to its end needs no other runsc call: %v", e.calls(""))

	rep, err := e.b.Destroy(context.Background(), h)
	require.NoError(t, err)
	require.Equal(t, cellos.TeardownReport{CellID: id, Destroyed: true, PeersTrackedAfter: 0}, rep)
	require.NoDirExists(t, bpath)
}

func TestFakeRunArgvRelativeBundleRoot(t *testing.T) {
	e := fakeSetup(t)
	t.Chdir(e.dir)
	t.Setenv(EnvBundleRoot, "")
	e.b = e.newBackend(WithBundleRoot("cells"))
	const id = "rel-1"
	e.create(fakeDoc(id))
	_, err := e.wait(id)
	require.NoError(t, err)
	runs := e.calls("run")
	require.Len(t, runs, 1)
	_, args := runs[0].sub()
	require.Equal(t, []string{"--bundle", e.bundle(id), RunscID(e.root, id)}, args, "the bundle is passed as an absolute path")
	require.True(t, filepath.IsAbs(e.bundle(id)))
	e.destroy(id)
}

func TestFakeRunscIDFixedWidth(t *testing.T) {
	ids := []string{"a", "a-1", "a-10", "a-100", "a-1000", "A-1", "b.1", strings.Repeat("z", 64)}
	const root = "/var/lib/cellos"
	width := len(RunscID(root, ids[0]))
	seen := map[string]string{}
	for _, id := range ids {
		r := RunscID(root, id)
		require.Len(t, r, width, "RunscID(%q) = %q", id, r)
		require.Less(t, width, 92, "runsc fails on ids over ~92 bytes")
		require.Regexp(t, `^[a-z0-9][a-z0-9-]*$`, r)
		require.Equal(t, r, RunscID(root, id), "deterministic")
		require.NotEqual(t, r, RunscID("/other/root", id), "bundle roots do not share runsc ids")
		require.NotContains(t, seen, r, "%q and %q collide", id, seen[r])
		seen[r] = id
	}
	for a := range seen {
		for b := range seen {
			if a != b {
				require.False(t, strings.HasPrefix(b, a), "%q (%s) is a prefix of %q (%s)", a, seen[a], b, seen[b])
			}
		}
	}
}

// The fake resolves ids by prefix like runsc: with cell ids as container ids, destroying a-1
// while a-10 runs would fail as ambiguous (or kill the wrong one).
func TestFakePrefixIDsDoNotCollide(t *testing.T) {
	e := fakeSetup(t)
	e.set(t, "FAKE_RUNSC_MODE", "hang")
	e.create(fakeDoc("a-1"))
	e.create(fakeDoc("a-10"))
	w1, w10 := e.awaitWorkload("a-1"), e.awaitWorkload("a-10")
	rep := e.destroy("a-1")
	require.Equal(t, 1, rep.PeersTrackedAfter)
	require.False(t, fakeAlive(w1))
	require.True(t, fakeAlive(w10), "destroying a-1 must not touch a-10")
	require.DirExists(t, e.bundle("a-10"))
	require.Equal(t, 0, e.destroy("a-10").PeersTrackedAfter)
	require.False(t, fakeAlive(w10))
}

func TestFakePlatformAndRunscFlags(t *testing.T) {
	e := fakeSetup(t, WithPlatform("ptrace"), WithRunscFlags("--debug", "--debug-log=/dev/null"), WithRunscFlags("--strace"))
	const id = "flags-1"
	e.set(t, "FAKE_RUNSC_MODE", "hang")
	e.create(fakeDoc(id))
	e.awaitWorkload(id)
	e.destroy(id)

	bpath, rid := e.bundle(id), e.runscID(id)
	runs := e.calls("run")
	require.Len(t, runs, 1)
	want := []string{"--root", e.state(), "--log", filepath.Join(bpath, "runsc.log"), "--log-format=json"}
	if os.Geteuid() != 0 {
		want = append(want, "--rootless")
	}
	want = append(want, "--platform=ptrace", "--network=none", "--ignore-cgroups", "--overlay2=none",
		"--debug", "--debug-log=/dev/null", "--strace", "run", "--bundle", bpath, rid)
	require.Equal(t, want, runs[0].Args)

	kills := e.calls("kill")
	require.NotEmpty(t, kills)
	want = []string{"--root", e.state()}
	if os.Geteuid() != 0 {
		want = append(want, "--rootless")
	}
	want = append(want, "--platform=ptrace", "--debug", "--debug-log=/dev/null", "--strace", "kill", rid, "KILL")
	require.Equal(t, want, kills[len(kills)-1].Args, "management commands get the same global flags")
}

func TestFakeRunscFlagsRefuseReserved(t *testing.T) {
	for _, f := range []string{"--root", "--root=/x", "-root=/x", "---root=/x", "--log=/x", "--log-format=text",
		"--network=host", "--network", "-network=sandbox", "--ignore-cgroups", "--overlay2=none", "--rootless",
		"--rootless=false", "--platform=kvm"} {
		t.Run(f, func(t *testing.T) {
			_, err := New(WithRunscFlags("--debug", f))
			require.Error(t, err)
			require.ErrorContains(t, err, "is set by the library")
		})
	}
	for _, f := range []string{"debug", "", "/tmp/x"} {
		_, err := New(WithRunscFlags(f))
		require.ErrorContains(t, err, "is not a flag", "%q", f)
	}
	_, err := New(WithRunscFlags("--debug", "--log-packets", "--debug-log=/var/log/runsc/", "-strace"))
	require.NoError(t, err, "flags that merely start like reserved ones are fine")
}

func TestFakeExitCodes(t *testing.T) {
	e := fakeSetup(t)
	signaled := func(code int) cellos.ExitStatus {
		return cellos.ExitStatus{Code: code, Signal: code - 128, Reason: cellos.ExitSignaled}
	}
	exited := func(code int) cellos.ExitStatus { return cellos.ExitStatus{Code: code, Reason: cellos.ExitExited} }
	for _, tc := range []struct {
		code int
		want cellos.ExitStatus
	}{
		{0, exited(0)}, {1, exited(1)}, {7, exited(7)},
		{128, exited(128)}, // nothing in runsc's log: the workload's own exit(128)
		{129, signaled(129)}, {137, signaled(137)}, {143, signaled(143)}, {192, signaled(192)},
		{193, exited(193)}, {255, exited(255)},
	} {
		t.Run(strconv.Itoa(tc.code), func(t *testing.T) {
			id := fmt.Sprintf("code-%d", tc.code)
			e.set(t, "FAKE_RUNSC_EXIT", strconv.Itoa(tc.code))
			e.create(fakeDoc(id))
			st, err := e.wait(id)
			require.NoError(t, err)
			require.Equal(t, tc.want, st)
			st, err = e.wait(id)
			require.NoError(t, err)
			require.Equal(t, tc.want, st, "a later waiter gets the same status")
			var rec shim.ExitRecord
			require.NoError(t, readJSON(filepath.Join(e.bundle(id), bundle.Exit), &rec))
			require.Equal(t, tc.want, rec.Status, "exit.json records the status durably")
			require.Equal(t, "exit "+strconv.Itoa(tc.code), rec.Runsc)
			rep := e.destroy(id)
			require.Equal(t, 0, rep.PeersTrackedAfter)
			require.NoDirExists(t, e.bundle(id))
			_, err = e.wait(id)
			require.ErrorIs(t, err, cellos.ErrNotTracked)
		})
	}
}

func TestFakeRunscFailure(t *testing.T) {
	e := fakeSetup(t)
	const id, msg = "fail-1", "fake-runsc: failed to load /bin/nothere: no such file or directory"
	e.set(t, "FAKE_RUNSC_MODE", "fail-start", "FAKE_RUNSC_MSG", msg)
	e.create(fakeDoc(id))
	for range 2 {
		st, err := e.wait(id)
		require.Error(t, err)
		require.ErrorIs(t, err, cellos.ErrHost)
		for _, other := range []error{cellos.ErrInvalidSpec, cellos.ErrNotTracked, cellos.ErrAlreadyExists, cellos.ErrUnsupported} {
			require.NotErrorIs(t, err, other)
		}
		require.ErrorContains(t, err, msg)
		require.Contains(t, err.Error(), id)
		var ce *cellos.Error
		require.ErrorAs(t, err, &ce)
		require.Equal(t, "wait", ce.Op)
		require.Equal(t, id, ce.CellID)
		require.Zero(t, st, "runsc's own failure is not an exit status")
	}
	e.destroy(id)
}

func TestFakeRunscCrash(t *testing.T) {
	e := fakeSetup(t)
	const id = "crash-1"
	e.set(t, "FAKE_RUNSC_MODE", "crash")
	e.create(fakeDoc(id))
	st, err := e.wait(id)
	require.ErrorIs(t, err, cellos.ErrHost)
	require.ErrorContains(t, err, "signal 9")
	require.Zero(t, st)
	require.Equal(t, "fake-runsc: about to crash\n", e.out(id).stdout.String())
	require.Equal(t, "fake-runsc: crashing\n", e.out(id).stderr.String())
	require.FileExists(t, e.stateFile(id), "a killed runsc leaves its state")

	e.destroy(id)
	require.True(t, e.hasCall("delete", "--force", e.runscID(id)), "Destroy must force-delete the leftover state: %v", e.calls(""))
	require.NoFileExists(t, e.stateFile(id))
}

func TestFakeRunscMissing(t *testing.T) {
	e := fakeSetup(t)
	const id = "missing-1"
	e.set(t, EnvRunscBin, "/nonexistent/runsc")
	_, err := e.b.Create(context.Background(), fakeDoc(id))
	require.ErrorIs(t, err, cellos.ErrHost)
	require.ErrorContains(t, err, "/nonexistent/runsc")
	require.NoDirExists(t, e.bundle(id))
	require.NoDirExists(t, e.root, "nothing is written when runsc is missing")
	_, err = e.wait(id)
	require.ErrorIs(t, err, cellos.ErrNotTracked)
}

// A runsc that passed the probe but can no longer be executed (its interpreter is gone) fails
// in the shim, after the bundle was written: Create must undo all of it.
func TestFakeRunscCannotStart(t *testing.T) {
	e := fakeSetup(t)
	interp := filepath.Join(e.dir, "interp")
	require.NoError(t, os.Symlink("/bin/sh", interp))
	wrapper := filepath.Join(e.dir, "runsc")
	script := "#!" + interp + "\nexec '" + e.bin + "' \"$@\"\n"
	require.NoError(t, os.WriteFile(wrapper, []byte(script), 0o755))
	e.set(t, EnvRunscBin, wrapper)
	e.create(fakeDoc("works-1"))
	_, err := e.wait("works-1")
	require.NoError(t, err)
	e.destroy("works-1")

	require.NoError(t, os.Remove(interp))
	const id = "broken-1"
	_, err = e.b.Create(context.Background(), fakeDoc(id))
	require.ErrorIs(t, err, cellos.ErrHost)
	require.ErrorContains(t, err, "starting runsc")
	require.ErrorContains(t, err, wrapper)
	require.NoDirExists(t, e.bundle(id))
	_, err = e.wait(id)
	require.ErrorIs(t, err, cellos.ErrNotTracked)
	require.Len(t, e.calls("run"), 1, "only the first cell ran")
	require.NoError(t, e.b.Close(context.Background())) // the spare shim a live Backend keeps is no leftover
	require.Empty(t, e.leftovers())
}

func TestFakeEnvBeatsOptions(t *testing.T) {
	e := fakeSetup(t, WithRunscPath("/nonexistent/runsc"), WithBundleRoot(filepath.Join(t.TempDir(), "option-root")))
	e.create(fakeDoc("env-1"))
	_, err := e.wait("env-1")
	require.NoError(t, err)
	require.Len(t, e.calls("run"), 1, "the runsc of CELLOS_GVISOR_RUNSC_BIN ran")
	require.DirExists(t, e.bundle("env-1"), "the bundle root of CELLOS_GVISOR_BUNDLE_ROOT is used")
	e.destroy("env-1")

	t.Setenv(EnvRunscBin, "")
	_, err = e.b.Create(context.Background(), fakeDoc("env-2"))
	require.ErrorIs(t, err, cellos.ErrHost)
	require.ErrorContains(t, err, "/nonexistent/runsc", "without the variable, the option applies")

	optRoot := filepath.Join(e.dir, "option-root")
	t.Setenv(EnvBundleRoot, "")
	b := e.newBackend(WithRunscPath(e.bin), WithBundleRoot(optRoot))
	_, err = b.Create(context.Background(), fakeDoc("opt-1"))
	require.NoError(t, err)
	st, err := b.WaitForExit(context.Background(), "opt-1")
	require.NoError(t, err)
	require.Equal(t, cellos.ExitExited, st.Reason)
	require.DirExists(t, filepath.Join(optRoot, "opt-1"))
	rep, err := b.Destroy(context.Background(), cellos.CellHandle{CellID: "opt-1"})
	require.NoError(t, err)
	require.True(t, rep.Destroyed)
	entries, err := os.ReadDir(optRoot)
	require.NoError(t, err)
	require.Len(t, entries, 1)
	require.Equal(t, ".runsc", entries[0].Name())
}

func TestFakeDuplicateID(t *testing.T) {
	e := fakeSetup(t)
	e.set(t, "FAKE_RUNSC_MODE", "hang")
	e.create(fakeDoc("dup"))
	w := e.awaitWorkload("dup")
	_, err := e.b.Create(context.Background(), fakeDoc("dup"))
	require.ErrorIs(t, err, cellos.ErrAlreadyExists)

	// Another backend on the same root sees the bundle on disk, and leaves it alone.
	other := e.newBackend()
	_, err = other.Create(context.Background(), fakeDoc("dup"))
	require.ErrorIs(t, err, cellos.ErrAlreadyExists)
	require.True(t, fakeAlive(w), "a refused duplicate must not touch the running cell")
	require.FileExists(t, filepath.Join(e.bundle("dup"), bundle.Config))
	require.Len(t, e.calls("run"), 1)

	// A directory nobody tracks is never reused or removed by Create.
	stale := e.bundle("stale")
	require.NoError(t, os.Mkdir(stale, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(stale, "keep"), []byte("mine"), 0o600))
	_, err = e.b.Create(context.Background(), fakeDoc("stale"))
	require.ErrorIs(t, err, cellos.ErrAlreadyExists)
	require.FileExists(t, filepath.Join(stale, "keep"))
	require.NoError(t, os.RemoveAll(stale))

	// Nor is an id whose runsc state is still there; Destroy of the untracked id cleans it.
	require.NoError(t, os.WriteFile(e.stateFile("ghost"), []byte("0\n"), 0o600))
	_, err = e.b.Create(context.Background(), fakeDoc("ghost"))
	require.ErrorIs(t, err, cellos.ErrAlreadyExists)
	require.NoDirExists(t, e.bundle("ghost"))
	rep := e.destroy("ghost")
	require.Equal(t, 1, rep.PeersTrackedAfter)
	require.True(t, e.hasCall("delete", "--force", e.runscID("ghost")))
	require.NoFileExists(t, e.stateFile("ghost"))
	require.Len(t, e.calls("run"), 1, "no refused Create started runsc")
}

func TestFakeBadIDsRefusedBeforeDisk(t *testing.T) {
	e := fakeSetup(t)
	victim := filepath.Join(e.dir, "victim")
	require.NoError(t, os.Mkdir(victim, 0o700))
	for _, id := range []string{"", "-rf", "--help", ".hidden", "..", "../victim", "a/b", "a b", "a\nb", "é",
		strings.Repeat("a", 65)} {
		_, err := e.b.Create(context.Background(), fakeDoc(id))
		require.ErrorIs(t, err, cellos.ErrInvalidSpec, "%q", id)
		require.Contains(t, cellos.Fields(err), "spec.id", "%q: %v", id, err)
		_, err = e.b.WaitForExit(context.Background(), id)
		require.ErrorIs(t, err, cellos.ErrInvalidSpec, "%q", id)
		rep, err := e.b.Destroy(context.Background(), cellos.CellHandle{CellID: id})
		require.ErrorIs(t, err, cellos.ErrInvalidSpec, "%q", id)
		require.False(t, rep.Destroyed)
	}
	require.NoDirExists(t, e.root)
	require.DirExists(t, victim, "Destroy of ../victim must not remove anything")
	require.Empty(t, e.calls(""))
}

func TestFakeUnsupported(t *testing.T) {
	e := fakeSetup(t)
	pids := fakeDoc("pids-1")
	pids.Spec.Resources = &cellos.ResourceSpec{Pids: 64}
	egress := fakeDoc("egress-1") // IPv6 egress: a cell's link is IPv4 only
	egress.Spec.Network = &cellos.NetworkSpec{Egress: []cellos.EgressRule{{CIDR: "2001:db8::/32", Port: 443, Protocol: "tcp"}}}
	for field, d := range map[string]*cellos.ExecutionCellDocument{"spec.resources.pids": pids, "spec.network.egress[0].cidr": egress} {
		_, err := e.b.Create(context.Background(), d)
		require.ErrorIs(t, err, cellos.ErrUnsupported, field)
		require.NotErrorIs(t, err, cellos.ErrInvalidSpec)
		require.Equal(t, []string{field}, cellos.Fields(err))
		require.ErrorContains(t, err, field)
		require.ErrorContains(t, err, d.Spec.ID)
	}
	require.NoDirExists(t, e.root)
	require.Empty(t, e.calls(""))
}

func TestFakeBindSourceMissing(t *testing.T) {
	e := fakeSetup(t)
	d := fakeDoc("bind-1")
	missing := filepath.Join(e.dir, "no-such-dir")
	d.Spec.Mounts = []cellos.MountSpec{{Type: cellos.MountBind, Source: missing, Destination: "/data"}}
	_, err := e.b.Create(context.Background(), d)
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
	require.Equal(t, []string{"spec.mounts[0].source"}, cellos.Fields(err))
	require.ErrorContains(t, err, missing)
	require.NoDirExists(t, e.root)
	require.Empty(t, e.calls(""))
}

func TestFakeConcurrentWaiters(t *testing.T) {
	e := fakeSetup(t)
	const id = "waiters-1"
	e.set(t, "FAKE_RUNSC_EXIT", "7", "FAKE_RUNSC_SLEEP", "0.5")
	e.create(fakeDoc(id))
	type result struct {
		st  cellos.ExitStatus
		err error
	}
	results := make(chan result, 10)
	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() {
			st, err := e.wait(id)
			results <- result{st, err}
		})
	}
	wg.Wait()
	close(results)
	want := cellos.ExitStatus{Code: 7, Reason: cellos.ExitExited}
	n := 0
	for r := range results {
		require.NoError(t, r.err)
		require.Equal(t, want, r.st)
		n++
	}
	require.Equal(t, 10, n)
	st, err := e.wait(id)
	require.NoError(t, err)
	require.Equal(t, want, st)
}

func TestFakeWaitCancelledLeavesCellRunning(t *testing.T) {
	e := fakeSetup(t)
	const id = "cancel-1"
	e.set(t, "FAKE_RUNSC_MODE", "hang")
	ctx, cancel := context.WithCancel(context.Background())
	h, err := e.b.Create(ctx, fakeDoc(id))
	require.NoError(t, err)
	cancel() // ctx bounds Create only
	t.Cleanup(func() { _, _ = e.b.Destroy(context.Background(), h) })
	w := e.awaitWorkload(id)
	shim := e.shimPid(id)

	wctx, wcancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, wcancel)
	start := time.Now()
	st, err := e.b.WaitForExit(wctx, id)
	require.ErrorIs(t, err, context.Canceled)
	require.Zero(t, st)
	require.Less(t, time.Since(start), 5*time.Second)

	tctx, tcancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer tcancel()
	_, err = e.b.WaitForExit(tctx, id)
	require.ErrorIs(t, err, context.DeadlineExceeded)

	require.True(t, fakeAlive(w), "an ended wait must not end the cell")
	require.True(t, fakeAlive(shim))
	require.Empty(t, e.calls("kill"))
	require.Empty(t, e.calls("delete"))

	// A waiter blocked when the cell is destroyed learns that it was.
	type result struct {
		st  cellos.ExitStatus
		err error
	}
	blocked := make(chan result, 1)
	go func() {
		st, err := e.wait(id)
		blocked <- result{st, err}
	}()
	time.Sleep(200 * time.Millisecond)
	select {
	case r := <-blocked:
		t.Fatalf("WaitForExit returned while the cell runs: %+v", r)
	default:
	}
	e.destroy(id)
	r := <-blocked
	require.NoError(t, r.err)
	require.Equal(t, cellos.ExitStatus{Code: 137, Signal: 9, Reason: cellos.ExitDestroyed}, r.st)
	_, err = e.wait(id)
	require.ErrorIs(t, err, cellos.ErrNotTracked, "after Destroy the cell is not tracked")
}

func TestFakeDestroyHanging(t *testing.T) {
	e := fakeSetup(t)
	const id = "hang-1"
	e.set(t, "FAKE_RUNSC_MODE", "hang")
	h := e.create(fakeDoc(id))
	shim := e.shimPid(id)
	// No wait for the workload: Destroy right after Create must cope with a container that
	// runsc does not know yet.
	start := time.Now()
	rep, err := e.b.Destroy(context.Background(), h)
	took := time.Since(start)
	require.NoError(t, err)
	require.Equal(t, cellos.TeardownReport{CellID: id, Destroyed: true, PeersTrackedAfter: 0}, rep)
	require.Less(t, took, 3*time.Second)
	t.Logf("Destroy took %v", took)

	require.NoDirExists(t, e.bundle(id))
	fakeRequireGone(t, shim, "the shim")
	runs := e.calls("run")
	require.Len(t, runs, 1)
	require.False(t, fakeAlive(runs[0].Pid), "runsc run is gone")
	require.True(t, e.hasCall("kill", e.runscID(id), "KILL"), "%v", e.calls(""))
	require.NoFileExists(t, e.stateFile(id), "runsc's state is gone")
	require.Equal(t, "fake-runsc: workload started\n", e.out(id).stdout.String())
	_, err = e.wait(id)
	require.ErrorIs(t, err, cellos.ErrNotTracked)
}

// When runsc's kill does not work, Destroy falls back to a forced delete.
func TestFakeDestroyKillFails(t *testing.T) {
	e := fakeSetup(t)
	const id = "killfails-1"
	e.set(t, "FAKE_RUNSC_MODE", "hang")
	e.create(fakeDoc(id))
	w := e.awaitWorkload(id)
	shim := e.shimPid(id)
	t.Setenv("FAKE_RUNSC_KILL_FAILS", "1")
	start := time.Now()
	e.destroy(id)
	took := time.Since(start)
	t.Logf("Destroy took %v", took)
	require.Less(t, took, killGrace+runscTimeout)
	require.NotEmpty(t, e.calls("kill"))
	require.True(t, e.hasCall("delete", "--force", e.runscID(id)), "%v", e.calls(""))
	require.False(t, fakeAlive(w))
	fakeRequireGone(t, shim, "the shim")
	require.NoDirExists(t, e.bundle(id))
}

// When runsc hangs, Destroy still returns within its own bounds and says what is left.
func TestFakeDestroyRunscHangs(t *testing.T) {
	e := fakeSetup(t)
	const id = "stuck-1"
	e.set(t, "FAKE_RUNSC_MODE", "hang")
	e.create(fakeDoc(id))
	e.awaitWorkload(id)
	shim := e.shimPid(id)
	t.Setenv("FAKE_RUNSC_HANG_DELETE", "1")

	start := time.Now()
	rep, err := e.b.Destroy(context.Background(), cellos.CellHandle{CellID: id})
	took := time.Since(start)
	t.Logf("Destroy with a hung runsc took %v: %v", took, err)
	require.Less(t, took, killGrace+2*runscTimeout+2*shimExitGrace+5*time.Second)
	require.Error(t, err)
	require.ErrorIs(t, err, cellos.ErrHost)
	require.False(t, rep.Destroyed, "runsc's state is left, so the cell is not destroyed")
	require.Equal(t, id, rep.CellID)
	require.ErrorContains(t, err, "runsc state left")
	require.ErrorContains(t, err, e.stateFile(id))
	require.FileExists(t, e.stateFile(id))
	fakeRequireGone(t, shim, "the shim")
	if _, serr := os.Stat(e.bundle(id)); serr == nil {
		require.ErrorContains(t, err, e.bundle(id), "a bundle that is kept is reported")
	}
	require.True(t, e.hasCall("delete", "--force", e.runscID(id)))
	_, err = e.wait(id)
	require.ErrorIs(t, err, cellos.ErrNotTracked)

	// Once runsc works again, Destroy of the no longer tracked id finishes the job.
	t.Setenv("FAKE_RUNSC_HANG_DELETE", "")
	rep = e.destroy(id)
	require.Equal(t, 0, rep.PeersTrackedAfter)
	require.NoFileExists(t, e.stateFile(id))
	require.NoDirExists(t, e.bundle(id))
}

func TestFakeDestroyTwiceAndUnknown(t *testing.T) {
	e := fakeSetup(t)
	e.set(t, "FAKE_RUNSC_MODE", "hang")
	for _, id := range []string{"p-a", "p-b", "p-c"} {
		e.create(fakeDoc(id))
	}
	rep := e.destroy("nope")
	require.Equal(t, 3, rep.PeersTrackedAfter)
	for _, c := range e.calls("") {
		require.NotContains(t, c.Args, e.runscID("nope"), "nothing to do for an unknown cell")
	}
	_, err := e.wait("nope")
	require.ErrorIs(t, err, cellos.ErrNotTracked)
	require.ErrorContains(t, err, "nope")

	require.Equal(t, 2, e.destroy("p-a").PeersTrackedAfter)
	require.Equal(t, 2, e.destroy("p-a").PeersTrackedAfter, "a second Destroy is fine")

	// Concurrent Destroys of one cell all succeed.
	var wg sync.WaitGroup
	reps := make(chan cellos.TeardownReport, 5)
	errs := make(chan error, 5)
	for range 5 {
		wg.Go(func() {
			rep, err := e.b.Destroy(context.Background(), cellos.CellHandle{CellID: "p-b"})
			reps <- rep
			errs <- err
		})
	}
	wg.Wait()
	close(reps)
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	for rep := range reps {
		require.True(t, rep.Destroyed)
		require.Equal(t, 1, rep.PeersTrackedAfter)
	}
	require.Equal(t, 0, e.destroy("p-c").PeersTrackedAfter)
	require.Len(t, e.calls("run"), 3)
}

func TestFakeWaitUnknown(t *testing.T) {
	e := fakeSetup(t)
	_, err := e.wait("never-created")
	require.ErrorIs(t, err, cellos.ErrNotTracked)
	require.ErrorContains(t, err, "never-created")
	_, err = e.wait("-bad")
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
}

func TestFakeOutput(t *testing.T) {
	e := fakeSetup(t)
	const id = "out-1"
	e.set(t, "FAKE_RUNSC_STDOUT", "line one\nline two\n", "FAKE_RUNSC_STDERR", "oops\n",
		"FAKE_RUNSC_STDOUT_BYTES", "300000", "FAKE_RUNSC_EXIT", "3")
	e.create(fakeDoc(id))
	st, err := e.wait(id)
	require.NoError(t, err)
	require.Equal(t, cellos.ExitStatus{Code: 3, Reason: cellos.ExitExited}, st)
	wantOut := "line one\nline two\n" + strings.Repeat("x", 300000)
	out := e.out(id)
	require.NotNil(t, out)
	require.Equal(t, wantOut, out.stdout.String(), "the writer has all of stdout when WaitForExit returns")
	require.Equal(t, "oops\n", out.stderr.String())
	data, err := os.ReadFile(filepath.Join(e.bundle(id), bundle.Stdout))
	require.NoError(t, err)
	require.Equal(t, wantOut, string(data))
	data, err = os.ReadFile(filepath.Join(e.bundle(id), bundle.Stderr))
	require.NoError(t, err)
	require.Equal(t, "oops\n", string(data))
	e.destroy(id)
}

func TestFakeOutputCap(t *testing.T) {
	e := fakeSetup(t, WithOutputCap(1000))
	const id = "cap-1"
	e.set(t, "FAKE_RUNSC_STDOUT_BYTES", "5000", "FAKE_RUNSC_STDERR", "small\n")
	e.create(fakeDoc(id))
	st, err := e.wait(id)
	require.NoError(t, err)
	require.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st)
	want := strings.Repeat("x", 1000) + "\n[cellos: stdout truncated at 1000 bytes]\n"
	data, err := os.ReadFile(filepath.Join(e.bundle(id), bundle.Stdout))
	require.NoError(t, err)
	require.Equal(t, want, string(data))
	require.Equal(t, want, e.out(id).stdout.String())
	require.Equal(t, "small\n", e.out(id).stderr.String())

	var rec shim.ExitRecord
	require.NoError(t, readJSON(filepath.Join(e.bundle(id), bundle.Exit), &rec))
	require.Equal(t, shim.StreamRecord{Bytes: 1000, Dropped: 4000, Truncated: true}, rec.Stdout)
	require.Equal(t, shim.StreamRecord{Bytes: 6}, rec.Stderr)
	shimLog, err := os.ReadFile(filepath.Join(e.bundle(id), bundle.ShimLog))
	require.NoError(t, err)
	require.Contains(t, string(shimLog), "stdout reached its cap of 1000 bytes")
	e.destroy(id)
}

func TestFakeTTL(t *testing.T) {
	e := fakeSetup(t)
	const id = "ttl-1"
	e.set(t, "FAKE_RUNSC_MODE", "hang")
	d := fakeDoc(id)
	d.Spec.Lifetime = &cellos.LifetimeSpec{TTLSeconds: 1}
	start := time.Now()
	e.create(d)
	w := e.awaitWorkload(id)
	st, err := e.wait(id)
	took := time.Since(start)
	require.NoError(t, err)
	require.Equal(t, cellos.ExitStatus{Code: 137, Signal: 9, Reason: cellos.ExitDeadlineExceeded}, st)
	require.GreaterOrEqual(t, took, time.Second)
	require.Less(t, took, 30*time.Second, "the lifetime is enforced (bound for a loaded machine)")
	require.True(t, e.hasCall("kill", e.runscID(id), "KILL"), "the shim kills through runsc: %v", e.calls(""))
	require.False(t, fakeAlive(w))
	e.destroy(id)
}
