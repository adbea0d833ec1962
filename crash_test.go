package gvisor_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
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

// The supervisor of the crash tests is this test binary, re-executed: TestHelperSupervisor does
// the work when CELLOS_TEST_SUPERVISOR names a scenario, and is a no-op otherwise.
const supervisorEnv = "CELLOS_TEST_SUPERVISOR"

func TestHelperSupervisor(t *testing.T) {
	scenario := os.Getenv(supervisorEnv)
	if scenario == "" {
		return
	}
	root := os.Getenv("CELLOS_TEST_ROOT")
	b, err := gvisor.New(gvisor.WithBundleRoot(root))
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	ctx := context.Background()
	create := func(id, script string) {
		if _, err := b.Create(ctx, sh(id, script)); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
	}
	switch scenario {
	case "crash":
		// The first cell starts its shim; the others are handed to spare shims.
		create("quick", "echo quick; exit 5")
		if _, err := b.WaitForExit(ctx, "quick"); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		awaitSpare()
		create("later", "echo before; sleep 3; echo after; exit 3")
		awaitSpare()
		spare := spareShims()[0]
		create("long", "echo long; sleep 120")
		awaitSpare()                // unclaimed when the supervisor dies
		fmt.Println("ready", spare) // the shim of "long"
		select {}
	}
	fmt.Println("ready")
	select {} // until killed
}

// startSupervisor runs the helper supervisor in a process group of its own and waits until it
// has created its cells.
func startSupervisor(t *testing.T, scenario, root string) (*exec.Cmd, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperSupervisor$", "-test.count=1")
	cmd.Env = append(os.Environ(), supervisorEnv+"="+scenario, "CELLOS_TEST_ROOT="+root)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr syncBuffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	line, _ := bufio.NewReader(out).ReadString('\n')
	rest, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "ready")
	require.True(t, ok, "supervisor said %q; stderr: %s", line, stderr.String())
	return cmd, strings.TrimSpace(rest)
}

// spareShims lists this process's unclaimed spare shims.
func spareShims() []int {
	var out []int
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, st := range stats {
		data, err := os.ReadFile(st)
		if err != nil {
			continue
		}
		fields := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
		if len(fields) < 2 || fields[0] == "Z" || fields[1] != strconv.Itoa(os.Getpid()) {
			continue
		}
		dir := filepath.Dir(st)
		cmdline, _ := os.ReadFile(dir + "/cmdline")
		cwd, _ := os.Readlink(dir + "/cwd")
		if string(cmdline) == "cellos-gvisor-shim\x00" && cwd == "/" {
			pid, _ := strconv.Atoi(filepath.Base(dir))
			out = append(out, pid)
		}
	}
	return out
}

// awaitSpare waits until this process has a spare shim.
func awaitSpare() {
	for deadline := time.Now().Add(30 * time.Second); len(spareShims()) == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			fmt.Println("error: no spare shim")
			os.Exit(1)
		}
	}
}

// spareOf reports whether an unclaimed spare shim of the helper supervisor for root runs.
func spareOf(root string) bool {
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		cmdline, _ := os.ReadFile(p + "/cmdline")
		environ, _ := os.ReadFile(p + "/environ")
		cwd, _ := os.Readlink(p + "/cwd")
		if string(cmdline) == "cellos-gvisor-shim\x00" && cwd == "/" &&
			bytes.Contains(environ, []byte("\x00CELLOS_TEST_ROOT="+root+"\x00")) {
			if cwd, _ := os.Readlink(p + "/cwd"); cwd == "/" {
				return true
			}
		}
	}
	return false
}

// shimOf returns the pid of bundle's shim: the shim (or keeper) process working in the bundle
// directory, or 0 when none runs.
func shimOf(bundle string) int {
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		cmdline, _ := os.ReadFile(p + "/cmdline")
		cwd, _ := os.Readlink(p + "/cwd")
		if (string(cmdline) == "cellos-gvisor-shim\x00" || string(cmdline) == "cellos-gvisor-pool\x00") && cwd == bundle {
			pid, _ := strconv.Atoi(filepath.Base(p))
			return pid
		}
	}
	return 0
}

// shimPid finds the pid of a cell's shim, 0 when it does not run.
func shimPid(t *testing.T, bundle string) int {
	t.Helper()
	return shimOf(bundle)
}

// childOf finds a child of pid (of any of its threads: Go forks from any of them).
func childOf(t *testing.T, pid int) int {
	t.Helper()
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	require.NoError(t, err)
	var fields []string
	for _, task := range tasks {
		data, _ := os.ReadFile(task)
		fields = append(fields, strings.Fields(string(data))...)
	}
	require.NotEmpty(t, fields, "process %d has no children", pid)
	child, _ := strconv.Atoi(fields[0])
	return child
}

func TestCrashSupervisorKilledThenRecover(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	sup, spare := startSupervisor(t, "crash", e.root)
	require.True(t, spareOf(e.root), "the supervisor has an unclaimed spare shim")
	// SIGKILL the supervisor's whole process group: a crash, or a Ctrl-C that nothing handles.
	require.NoError(t, syscall.Kill(-sup.Process.Pid, syscall.SIGKILL))
	_ = sup.Wait()

	// Leftovers of an interrupted Create (its marker is its first file), a directory the library
	// did not make, and a symlink planted in the bundle root.
	half := filepath.Join(e.root, "half")
	require.NoError(t, os.Mkdir(half, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(half, "cellos.json"), []byte(`{"protocol": 1, "cellId": "half"}`), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(half, "config.json"), []byte("{}"), 0o644))
	foreign := filepath.Join(e.root, "foreign")
	require.NoError(t, os.Mkdir(foreign, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(foreign, "data"), []byte("not a cell"), 0o644))
	victim := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(victim, "precious"), []byte("keep me"), 0o644))
	require.NoError(t, os.Symlink(victim, filepath.Join(e.root, "planted")))

	assert.Equal(t, spare, strconv.Itoa(shimOf(filepath.Join(e.root, "long"))), "the long cell runs under a spare shim")
	// The dead supervisor's unclaimed spare shim exits by itself.
	require.Eventually(t, func() bool { return !spareOf(e.root) }, 10*time.Second, 20*time.Millisecond,
		"the dead supervisor's spare shim still runs")

	// The cells went on without their supervisor.
	require.Eventually(t, func() bool {
		data, _ := os.ReadFile(filepath.Join(e.root, "later", "stdout.log"))
		return string(data) == "before\nafter\n"
	}, 20*time.Second, 20*time.Millisecond, "output after the supervisor died")

	rep, err := e.b.Recover(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []string{"later", "long", "quick"}, rep.Adopted)
	assert.Equal(t, []string{"half"}, rep.Cleaned)
	data, err := os.ReadFile(filepath.Join(victim, "precious"))
	require.NoError(t, err, "the symlink's target must not be touched")
	assert.Equal(t, "keep me", string(data))
	// What is not the library's is skipped, never removed.
	assert.FileExists(t, filepath.Join(foreign, "data"))
	_, err = os.Lstat(filepath.Join(e.root, "planted"))
	assert.NoError(t, err, "the planted symlink is left alone")
	require.NoError(t, os.RemoveAll(foreign))
	require.NoError(t, os.Remove(filepath.Join(e.root, "planted")))

	st, err := e.b.WaitForExit(context.Background(), "quick")
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 5, Reason: cellos.ExitExited}, st)
	st, err = e.b.WaitForExit(context.Background(), "later")
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 3, Reason: cellos.ExitExited}, st)
	assert.Equal(t, "before\nafter\n", e.out("later").stdout.String(), "adopted cells' output from the start")

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = e.b.WaitForExit(ctx, "long")
	require.ErrorIs(t, err, context.DeadlineExceeded, "the long cell still runs")
	for _, id := range rep.Adopted {
		e.destroy(cellos.CellHandle{CellID: id})
	}
	assert.Empty(t, e.leftovers())

	// A second Recover finds nothing.
	rep, err = e.b.Recover(context.Background())
	require.NoError(t, err)
	assert.Empty(t, rep.Adopted)
	assert.Empty(t, rep.Cleaned)
}

func TestCrashRunscKilledMidCell(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	h := e.create(sh("runsc-killed", "echo up; sleep 60"))
	require.Eventually(t, func() bool { return e.out("runsc-killed").stdout.String() == "up\n" }, 10*time.Second, 10*time.Millisecond)
	shim := shimPid(t, filepath.Join(e.root, "runsc-killed"))
	require.NotZero(t, shim)
	runscPid := childOf(t, shim)
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", runscPid))
	require.Contains(t, string(cmdline), gvisor.RunscID(e.root, "runsc-killed"))
	require.NoError(t, syscall.Kill(runscPid, syscall.SIGKILL))
	_, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "signal 9")
	rep := e.destroy(h)
	assert.True(t, rep.Destroyed)
	assert.Empty(t, e.leftovers())
}

func TestCrashRecoverCellThatExitedUnsupervised(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	other, err := gvisor.New(gvisor.WithBundleRoot(e.root), gvisor.WithLogger(zaptest.NewLogger(t)))
	require.NoError(t, err)
	t.Cleanup(func() { _ = other.Close(context.Background()) })
	// Another backend (a supervisor that then went away without destroying) starts a cell that
	// exits on its own.
	_, err = other.Create(context.Background(), sh("orphan", "echo bye; exit 9"))
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		_, err := os.Stat(filepath.Join(e.root, "orphan", "exit.json"))
		return err == nil
	}, 20*time.Second, 20*time.Millisecond)
	rep, err := e.b.Recover(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []string{"orphan"}, rep.Adopted)
	st, err := e.b.WaitForExit(context.Background(), "orphan")
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 9, Reason: cellos.ExitExited}, st)
	assert.Equal(t, "bye\n", e.out("orphan").stdout.String())
	e.destroy(cellos.CellHandle{CellID: "orphan"})
}

// A spare shim serves the next Create like a shim started for it; without one (killed, or after
// Close) Create starts the shim itself.
func TestSpareShim(t *testing.T) {
	e := newRealEnv(t)
	st, err := e.run(sh("first", "echo first"))
	require.NoError(t, err)
	require.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st)
	require.Eventually(t, func() bool { return len(spareShims()) == 1 }, 30*time.Second, 5*time.Millisecond,
		"a spare shim after a cell exited")

	spare := spareShims()[0]
	h := e.create(sh("spared", "echo from the spare; echo err >&2; exit 7"))
	bundle := filepath.Join(e.root, "spared")
	assert.Equal(t, spare, shimPid(t, bundle), "the cell was handed to the spare shim")
	st, err = e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 7, Reason: cellos.ExitExited}, st)
	assert.Equal(t, "from the spare\n", e.out("spared").stdout.String())
	assert.Equal(t, "err\n", e.out("spared").stderr.String())
	data, err := os.ReadFile(filepath.Join(bundle, "stdout.log"))
	require.NoError(t, err)
	assert.Equal(t, "from the spare\n", string(data))

	// A spare killed from outside: the next Create starts its own shim.
	require.Eventually(t, func() bool { return len(spareShims()) == 1 }, 30*time.Second, 5*time.Millisecond)
	require.NoError(t, syscall.Kill(spareShims()[0], syscall.SIGKILL))
	st, err = e.run(sh("afterkill", "exit 3"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 3, Reason: cellos.ExitExited}, st)

	// Close ends the spare; later cells start their shims themselves, and no spare comes back.
	require.Eventually(t, func() bool { return len(spareShims()) == 1 }, 30*time.Second, 5*time.Millisecond)
	require.NoError(t, e.b.Close(context.Background()))
	assert.Empty(t, spareShims(), "Close ends the spare shim")
	h = e.create(sh("closed", "sleep 0.2"))
	assert.NotZero(t, shimPid(t, filepath.Join(e.root, "closed")))
	_, err = e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	time.Sleep(100 * time.Millisecond)
	assert.Empty(t, spareShims(), "no spare after Close")
}
