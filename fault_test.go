package gvisor_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// mountTmpfs mounts a small tmpfs for a test and unmounts it at cleanup.
func mountTmpfs(t *testing.T, size string, flags uintptr) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	require.NoError(t, unix.Mount("tmpfs", dir, "tmpfs", flags, "size="+size+",mode=0711"))
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

func TestFaultBundleRootReadOnly(t *testing.T) {
	requireRunsc(t)
	root := mountTmpfs(t, "1m", unix.MS_RDONLY)
	b, err := gvisor.New(gvisor.WithBundleRoot(root), gvisor.WithStateRoot(t.TempDir()), gvisor.WithMinFreeSpace(0))
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	_, err = b.Create(context.Background(), sh("rofs", "true"))
	require.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "read-only file system")
	entries, _ := os.ReadDir(root)
	assert.Empty(t, entries)
}

func TestFaultBundleRootFull(t *testing.T) {
	requireRunsc(t)
	root := mountTmpfs(t, "256k", 0)
	// Fill it, leaving less than a bundle needs.
	filler, err := os.Create(filepath.Join(root, ".filler"))
	require.NoError(t, err)
	_, _ = filler.Write(make([]byte, 1<<20)) // fails with ENOSPC once full
	filler.Close()
	// Below the free-space floor, Create refuses before it writes anything.
	floor, err := gvisor.New(gvisor.WithBundleRoot(root), gvisor.WithStateRoot(t.TempDir()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = floor.Close(context.Background()) })
	_, err = floor.Create(context.Background(), sh("full", "true"))
	require.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "below the floor")
	// Without a floor, the full filesystem itself fails the Create, which removes what it wrote.
	b, err := gvisor.New(gvisor.WithBundleRoot(root), gvisor.WithStateRoot(t.TempDir()), gvisor.WithMinFreeSpace(0))
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	_, err = b.Create(context.Background(), sh("full", "true"))
	require.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "no space left on device")
	entries, _ := os.ReadDir(root)
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	assert.Equal(t, []string{".filler"}, names, "the half-written bundle was not removed")
}

func TestFaultDestroyRaces(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	for round := range 3 {
		id := fmt.Sprintf("race-%d", round)
		h, err := e.b.Create(context.Background(), sh(id, "sleep 30"))
		require.NoError(t, err)
		var wg sync.WaitGroup
		reports := make([]cellos.TeardownReport, 3)
		errs := make([]error, 3)
		var waitErr error
		var st cellos.ExitStatus
		wg.Add(4)
		go func() { defer wg.Done(); st, waitErr = e.b.WaitForExit(context.Background(), id) }()
		for i := range 3 {
			go func() { defer wg.Done(); reports[i], errs[i] = e.b.Destroy(context.Background(), h) }()
		}
		wg.Wait()
		for i := range 3 {
			require.NoError(t, errs[i])
			assert.True(t, reports[i].Destroyed)
		}
		// The waiter either saw the destroyed cell or came too late to find it.
		if waitErr == nil {
			assert.Equal(t, cellos.ExitDestroyed, st.Reason)
		} else {
			assert.ErrorIs(t, waitErr, cellos.ErrNotTracked)
		}
		assert.Empty(t, e.leftovers())
	}
}

func TestFaultCreateRacesDestroy(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	for round := range 5 {
		id := fmt.Sprintf("cd-%d", round)
		var wg sync.WaitGroup
		var createErr, destroyErr error
		var rep cellos.TeardownReport
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, createErr = e.b.Create(context.Background(), sh(id, "sleep 30"))
		}()
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(round) * 15 * time.Millisecond)
			rep, destroyErr = e.b.Destroy(context.Background(), cellos.CellHandle{CellID: id})
		}()
		wg.Wait()
		require.NoError(t, destroyErr)
		assert.True(t, rep.Destroyed)
		if createErr != nil {
			// Destroy held the id: Create was refused, not half done.
			assert.ErrorIs(t, createErr, cellos.ErrAlreadyExists)
		}
		// Whichever came first, one more Destroy leaves nothing.
		rep, err := e.b.Destroy(context.Background(), cellos.CellHandle{CellID: id})
		require.NoError(t, err)
		assert.True(t, rep.Destroyed)
		assert.Empty(t, e.leftovers(), "round %d", round)
	}
}

func TestFaultPlantedSymlink(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	victim := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(victim, "precious"), []byte("keep"), 0o644))
	require.NoError(t, os.MkdirAll(e.root, 0o711))
	require.NoError(t, os.Symlink(victim, filepath.Join(e.root, "planted")))
	_, err := e.b.Create(context.Background(), sh("planted", "true"))
	require.ErrorIs(t, err, cellos.ErrAlreadyExists)
	entries, _ := os.ReadDir(victim)
	require.Len(t, entries, 1, "Create followed the symlink")
	rep, err := e.b.Destroy(context.Background(), cellos.CellHandle{CellID: "planted"})
	require.NoError(t, err)
	assert.True(t, rep.Destroyed)
	_, err = os.Lstat(filepath.Join(e.root, "planted"))
	assert.ErrorIs(t, err, os.ErrNotExist)
	data, err := os.ReadFile(filepath.Join(victim, "precious"))
	require.NoError(t, err, "Destroy followed the symlink")
	assert.Equal(t, "keep", string(data))
}

func TestFaultHostileDocuments(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	huge := make([]string, cellos.MaxArgs+1)
	for i := range huge {
		huge[i] = "x"
	}
	bigEnv := map[string]string{"BIG": strings.Repeat("y", cellos.MaxArgEnvBytes)}
	cases := map[string]struct {
		doc   *cellos.ExecutionCellDocument
		field string
	}{
		"dotdot id":     {sh("..", "true"), "spec.id"},
		"traversal id":  {sh("../../etc", "true"), "spec.id"},
		"NUL in id":     {sh("a\x00b", "true"), "spec.id"},
		"NUL in argv":   {doc("nul", "/bin/sh", "-c", "true\x00rm -rf /"), "spec.run.argv[2]"},
		"too many args": {doc("args", huge...), "spec.run.argv"},
		"huge env":      {&cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind, Spec: cellos.CellSpec{ID: "env", Run: cellos.RunSpec{Argv: []string{"/bin/true"}, Env: bigEnv}}}, "spec.run"},
		"dotdot workdir": {func() *cellos.ExecutionCellDocument {
			d := sh("wd", "true")
			d.Spec.Run.WorkingDir = "/tmp/../.."
			return d
		}(), "spec.run.workingDir"},
		"dotdot rootfs": {func() *cellos.ExecutionCellDocument {
			d := sh("rf", "true")
			d.Spec.Rootfs = &cellos.RootfsSpec{Path: "/srv/../etc"}
			return d
		}(), "spec.rootfs.path"},
		"dotdot bind src": {func() *cellos.ExecutionCellDocument {
			d := sh("bs", "true")
			d.Spec.Mounts = []cellos.MountSpec{{Type: "bind", Source: "/tmp/../etc", Destination: "/x"}}
			return d
		}(), "spec.mounts[0].source"},
		"NUL in bind dest": {func() *cellos.ExecutionCellDocument {
			d := sh("bd", "true")
			d.Spec.Mounts = []cellos.MountSpec{{Type: "tmpfs", Destination: "/x\x00/y"}}
			return d
		}(), "spec.mounts[0].destination"},
	}
	for name, c := range cases {
		_, err := e.b.Create(context.Background(), c.doc)
		require.ErrorIs(t, err, cellos.ErrInvalidSpec, name)
		assert.Contains(t, cellos.Fields(err), c.field, "%s: %v", name, err)
	}
	entries, err := os.ReadDir(e.root)
	require.NoError(t, err)
	assert.Empty(t, entries, "nothing may be written for refused documents")
}

// descendants counts the live processes below pid.
func descendants(pid int) int {
	children := map[int][]int{}
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, s := range stats {
		data, err := os.ReadFile(s)
		if err != nil {
			continue
		}
		i := strings.LastIndexByte(string(data), ')')
		fields := strings.Fields(string(data[i+1:]))
		if len(fields) < 2 || fields[0] == "Z" {
			continue
		}
		ppid, _ := strconv.Atoi(fields[1])
		p, _ := strconv.Atoi(filepath.Base(filepath.Dir(s)))
		children[ppid] = append(children[ppid], p)
	}
	n := 0
	var walk func(int)
	walk = func(p int) {
		for _, c := range children[p] {
			n++
			walk(c)
		}
	}
	walk(pid)
	return n
}

func openFDs(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(entries)
}

// TestFaultTwoHundredCells runs alone (not parallel) so that goroutine, process and descriptor
// counts are its own.
func TestFaultTwoHundredCells(t *testing.T) {
	requireRunsc(t)
	if testing.Short() {
		t.Skip("200 real cells take about a minute")
	}
	root := t.TempDir()
	b, err := gvisor.New(gvisor.WithBundleRoot(root), gvisor.WithLogger(zap.NewNop()),
		gvisor.WithOutput(func(string) (io.Writer, io.Writer) { return io.Discard, nil }))
	require.NoError(t, err)
	goleakOpts := goleak.IgnoreCurrent()
	procsBefore, fdsBefore := descendants(os.Getpid()), openFDs(t)

	const total, parallel = 200, 4
	ids := make(chan int)
	var wg sync.WaitGroup
	errs := make(chan error, total)
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range ids {
				id := fmt.Sprintf("loop-%d", i)
				h, err := b.Create(context.Background(), sh(id, "echo hi"))
				if err != nil {
					errs <- err
					continue
				}
				if i%2 == 0 { // half are destroyed after they exit, half while they may still run
					if _, err := b.WaitForExit(context.Background(), id); err != nil {
						errs <- err
					}
				}
				rep, err := b.Destroy(context.Background(), h)
				if err == nil && !rep.Destroyed {
					err = fmt.Errorf("%s: not destroyed", id)
				}
				if err != nil {
					errs <- err
				}
			}
		}()
	}
	for i := range total {
		ids <- i
	}
	close(ids)
	wg.Wait()
	close(errs)
	for err := range errs {
		assert.NoError(t, err)
	}
	require.NoError(t, b.Close(context.Background())) // the spare shim goes
	procsAfter, fdsAfter := descendants(os.Getpid()), openFDs(t)
	entries, _ := os.ReadDir(root)
	var left []string
	for _, en := range entries {
		if en.Name() != ".runsc" {
			left = append(left, en.Name())
		}
	}
	state, _ := os.ReadDir(filepath.Join(root, ".runsc"))
	t.Logf("200 cells: processes below the test %d -> %d, open fds %d -> %d, bundle entries left %d, runsc state entries %d",
		procsBefore, procsAfter, fdsBefore, fdsAfter, len(left), len(state))
	assert.Equal(t, procsBefore, procsAfter, "processes leaked")
	assert.Equal(t, fdsBefore, fdsAfter, "descriptors leaked")
	assert.Empty(t, left, "bundles left")
	assert.Empty(t, state, "runsc state left")
	goleak.VerifyNone(t, goleakOpts)
}

// Ids are unique per bundle root, cgroup paths host-wide: a cell's cgroups are named after its
// runsc id (bundle root and cell id), so tearing down a cell of one root never touches the
// cgroups of a same-named cell of another.
func TestFaultSameIDOtherRootKeepsCgroups(t *testing.T) {
	t.Parallel()
	a, b := newRealEnv(t), newRealEnv(t)
	d := sh("shared-id-cg", "echo up; sleep 30")
	d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 128 << 20}
	h := b.create(d)
	require.Eventually(t, func() bool { return b.out("shared-id-cg").stdout.String() == "up\n" }, 10*time.Second, 10*time.Millisecond)
	// The same id without limits in the other root, and a Destroy of it there.
	st, err := a.run(sh("shared-id-cg", "true"))
	require.NoError(t, err)
	require.Equal(t, cellos.ExitExited, st.Reason)
	a.destroy(cellos.CellHandle{CellID: "shared-id-cg"})
	assert.NotEmpty(t, b.cgroupDirs("shared-id-cg"), "the other root's cgroups were removed")
	assert.Empty(t, a.cgroupDirs("shared-id-cg"), "the destroyed cell's cgroups are gone")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = b.b.WaitForExit(ctx, h.CellID)
	assert.ErrorIs(t, err, context.DeadlineExceeded, "the other root's cell was killed")
}
