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
		create("quick", "echo quick; exit 5")
		create("later", "echo before; sleep 3; echo after; exit 3")
		create("long", "echo long; sleep 120")
		if _, err := b.WaitForExit(ctx, "quick"); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
	}
	fmt.Println("ready")
	select {} // until killed
}

// startSupervisor runs the helper supervisor in a process group of its own and waits until it
// has created its cells.
func startSupervisor(t *testing.T, scenario, root string) *exec.Cmd {
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
	require.Equal(t, "ready\n", line, "supervisor stderr: %s", stderr.String())
	return cmd
}

// shimPid finds the pid of a cell's shim.
func shimPid(t *testing.T, bundle string) int {
	t.Helper()
	want := []byte("cellos-gvisor-shim\x00" + bundle + "\x00")
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if data, err := os.ReadFile(p); err == nil && bytes.Equal(data, want) {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			return pid
		}
	}
	return 0
}

// childOf finds a child of pid.
func childOf(t *testing.T, pid int) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	require.NoError(t, err)
	fields := strings.Fields(string(data))
	require.NotEmpty(t, fields, "process %d has no children", pid)
	child, _ := strconv.Atoi(fields[0])
	return child
}

func TestCrashSupervisorKilledThenRecover(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	sup := startSupervisor(t, "crash", e.root)
	// SIGKILL the supervisor's whole process group: a crash, or a Ctrl-C that nothing handles.
	require.NoError(t, syscall.Kill(-sup.Process.Pid, syscall.SIGKILL))
	_ = sup.Wait()

	// Leftovers of an interrupted Create and a symlink planted in the bundle root.
	half := filepath.Join(e.root, "half")
	require.NoError(t, os.Mkdir(half, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(half, "config.json"), []byte("{}"), 0o644))
	victim := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(victim, "precious"), []byte("keep me"), 0o644))
	require.NoError(t, os.Symlink(victim, filepath.Join(e.root, "planted")))

	// The cells went on without their supervisor.
	require.Eventually(t, func() bool {
		data, _ := os.ReadFile(filepath.Join(e.root, "later", "stdout.log"))
		return string(data) == "before\nafter\n"
	}, 20*time.Second, 20*time.Millisecond, "output after the supervisor died")

	rep, err := e.b.Recover(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []string{"later", "long", "quick"}, rep.Adopted)
	assert.Equal(t, []string{"half", "planted"}, rep.Cleaned)
	data, err := os.ReadFile(filepath.Join(victim, "precious"))
	require.NoError(t, err, "the symlink's target must not be touched")
	assert.Equal(t, "keep me", string(data))

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
