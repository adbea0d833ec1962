package proc

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestParseStat(t *testing.T) {
	// A command name with spaces and a ')' must not shift the fields.
	line := "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 123456 1000 10 18446744073709551615\n"
	st, err := parseStat([]byte(line))
	require.NoError(t, err)
	assert.Equal(t, Stat{State: 'S', PPid: 1, Session: 4242, Start: 123456, Ticks: 7 + 3 + 2 + 1}, st)
	_, err = parseStat([]byte("4242 (x) S 1 2"))
	assert.Error(t, err)
	_, err = parseStat([]byte("no parenthesis"))
	assert.Error(t, err)
}

func TestReadStatSelf(t *testing.T) {
	a, err := ReadStat(os.Getpid())
	require.NoError(t, err)
	b, err := ReadStat(os.Getpid())
	require.NoError(t, err)
	assert.Equal(t, a.Start, b.Start, "the start time names the process")
	assert.NotZero(t, a.Start)
}

func TestHandleWaitAndSignal(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	require.NoError(t, cmd.Start())
	h, err := Open(cmd.Process.Pid)
	require.NoError(t, err)
	defer h.Close()
	assert.False(t, h.Exited())

	// A wait bounded by ctx ends with ctx's error and can be repeated.
	for range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
		assert.ErrorIs(t, h.Wait(ctx), context.DeadlineExceeded)
		cancel()
	}
	require.NoError(t, h.Signal(unix.SIGKILL))
	require.NoError(t, h.Wait(context.Background()))
	assert.True(t, h.Exited(), "exited, even before the parent reaps it")
	_ = cmd.Wait()
	assert.ErrorIs(t, h.Signal(unix.SIGKILL), os.ErrProcessDone)
}

func TestOpenGoneProcess(t *testing.T) {
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	_, err := Open(cmd.Process.Pid)
	assert.ErrorIs(t, err, os.ErrProcessDone)
}

func TestDescendantsAndCPU(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 30 & wait")
	require.NoError(t, cmd.Start())
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	require.Eventually(t, func() bool { return len(Descendants(cmd.Process.Pid)) == 1 }, 5*time.Second, 10*time.Millisecond)
	assert.Contains(t, Descendants(os.Getpid()), cmd.Process.Pid)
	_, err := CPUNanos(cmd.Process.Pid)
	assert.NoError(t, err)
	pss, err := PSSBytes(os.Getpid())
	require.NoError(t, err)
	assert.Greater(t, pss, uint64(1<<20), "a Go test binary uses more than 1 MiB")
}

func TestKillTreeKillsDescendantsOnly(t *testing.T) {
	// sh with a child sleep: both die; an unrelated sleep does not.
	tree := exec.Command("/bin/sh", "-c", "sleep 60 & wait")
	tree.SysProcAttr = &unix.SysProcAttr{Setsid: true}
	require.NoError(t, tree.Start())
	other := exec.Command("/bin/sleep", "60")
	require.NoError(t, other.Start())
	t.Cleanup(func() { _ = other.Process.Kill(); _ = other.Wait() })
	var kids []int
	require.Eventually(t, func() bool { kids = Descendants(tree.Process.Pid); return len(kids) == 1 }, 5*time.Second, 5*time.Millisecond)
	id, err := IdentOf(tree.Process.Pid)
	require.NoError(t, err)
	require.NoError(t, KillTree(id))
	_ = tree.Wait()
	assert.Eventually(t, func() bool {
		st, err := ReadStat(kids[0])
		return err != nil || st.State == 'Z'
	}, 5*time.Second, 5*time.Millisecond, "the child dies with the root")
	otherID, err := IdentOf(other.Process.Pid)
	require.NoError(t, err)
	assert.True(t, otherID.Alive(), "a process outside the tree is not signalled")
	// A stale Ident (the process is gone) signals nothing.
	assert.ErrorIs(t, KillTree(id), os.ErrProcessDone)
	assert.ErrorIs(t, KillTree(Ident{Pid: other.Process.Pid, Start: otherID.Start + 1}), os.ErrProcessDone, "a reused pid is not the recorded process")
}
