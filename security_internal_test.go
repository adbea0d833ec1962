package gvisor

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/shim"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/netcell"
)

// A document without limits gets the Backend's defaults: runsc runs with cgroups, config.json
// carries the limits, the cell's cgroups are named after its runsc id and go with Destroy.
func TestFakeDefaultLimits(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("cgroups need root")
	}
	e := fakeSetup(t)
	e.b = e.newBackend(WithDefaultResources(DefaultResources{MemoryBytes: 256 << 20, CPUMillis: 500, TTL: 1500 * time.Millisecond}))
	h := e.create(fakeDoc("limits"))
	require.NotNil(t, h.CgroupPath)
	assert.Equal(t, "/cellos/"+e.runscID("limits"), *h.CgroupPath)
	var cfg struct {
		Linux struct {
			CgroupsPath string `json:"cgroupsPath"`
			Resources   struct {
				Memory struct{ Limit int64 } `json:"memory"`
				CPU    struct{ Quota int64 } `json:"cpu"`
			} `json:"resources"`
		} `json:"linux"`
		Mounts []struct {
			Destination string   `json:"destination"`
			Options     []string `json:"options"`
		} `json:"mounts"`
	}
	require.NoError(t, readJSON(filepath.Join(e.bundle("limits"), bundle.Config), &cfg))
	assert.Equal(t, *h.CgroupPath, cfg.Linux.CgroupsPath)
	assert.Equal(t, int64(256<<20), cfg.Linux.Resources.Memory.Limit)
	assert.Equal(t, int64(50_000), cfg.Linux.Resources.CPU.Quota)
	for _, m := range cfg.Mounts {
		if m.Destination == "/tmp" {
			assert.Contains(t, m.Options, "size=268435456", "/tmp is as large as the memory limit")
		}
	}
	var shim shim.Config
	require.NoError(t, readJSON(filepath.Join(e.bundle("limits"), bundle.ShimConfig), &shim))
	assert.Equal(t, int64(2), shim.TTLSeconds, "the default lifetime, rounded up to seconds")
	_, err := e.wait("limits")
	require.NoError(t, err)
	runs := e.calls("run")
	require.Len(t, runs, 1)
	assert.NotContains(t, runs[0].Args, "--ignore-cgroups")
	e.destroy("limits")
	assert.Empty(t, e.b.cg.Dirs(e.runscID("limits")))

	// The document's own limits win, field by field; the caller's document is not changed.
	d := fakeDoc("own")
	d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 64 << 20}
	h = e.create(d)
	assert.Equal(t, &cellos.ResourceSpec{MemoryBytes: 64 << 20}, d.Spec.Resources)
	assert.Nil(t, d.Spec.Lifetime)
	require.NoError(t, readJSON(filepath.Join(e.bundle("own"), bundle.Config), &cfg))
	assert.Equal(t, int64(64<<20), cfg.Linux.Resources.Memory.Limit)
	assert.Equal(t, int64(50_000), cfg.Linux.Resources.CPU.Quota)
	_, _ = e.wait("own")
}

// Without WithDefaultResources, the library's defaults apply: 1 GiB and one CPU.
func TestDefaultLimitsValues(t *testing.T) {
	b, err := New(WithBundleRoot(t.TempDir()))
	require.NoError(t, err)
	d := fakeDoc("x")
	got := b.withDefaults(d)
	if os.Geteuid() == 0 && b.cg != nil {
		assert.Equal(t, &cellos.ResourceSpec{MemoryBytes: 1 << 30, CPUMillis: 1000}, got.Spec.Resources)
	} else {
		assert.Same(t, d, got, "where cgroups cannot enforce them, the library's own defaults are skipped")
	}
	assert.Nil(t, d.Spec.Resources, "the caller's document is not changed")
	_, err = New(WithDefaultResources(DefaultResources{MemoryBytes: 1 << 20}))
	assert.ErrorContains(t, err, "below the minimum")
	_, err = New(WithDefaultResources(DefaultResources{CPUMillis: -1}))
	assert.Error(t, err)
}

// A Destroy that races a cell's own exit, and whose kills all fail, reports the exit the cell
// made, not "destroyed".
func TestFakeDestroyRacingNaturalExit(t *testing.T) {
	e := fakeSetup(t)
	e.set(t, "FAKE_RUNSC_SLEEP", "0.5", "FAKE_RUNSC_KILL_FAILS", "1", "FAKE_RUNSC_EXIT", "3")
	h := e.create(fakeDoc("natural"))
	waited := make(chan cellos.ExitStatus, 1)
	go func() {
		st, _ := e.wait("natural")
		waited <- st
	}()
	rep, err := e.b.Destroy(context.Background(), h)
	require.NoError(t, err)
	assert.True(t, rep.Destroyed)
	assert.Equal(t, cellos.ExitStatus{Code: 3, Reason: cellos.ExitExited}, <-waited)

	// When the kill takes effect, the waiters get "destroyed".
	e.set(t, "FAKE_RUNSC_SLEEP", "30", "FAKE_RUNSC_KILL_FAILS", "")
	h = e.create(fakeDoc("killed"))
	go func() {
		st, _ := e.wait("killed")
		waited <- st
	}()
	_, err = e.b.Destroy(context.Background(), h)
	require.NoError(t, err)
	assert.Equal(t, destroyedStatus, <-waited)
}

// Bind sources and image roots that overlap the library's own state or the host's kernel
// interfaces are refused, symlinks resolved; WithBindSources narrows further.
func TestPolicyProtectedSources(t *testing.T) {
	top := t.TempDir()
	root := filepath.Join(top, "root")
	require.NoError(t, os.MkdirAll(filepath.Join(root, "cell"), 0o700))
	allowed := filepath.Join(top, "allowed")
	require.NoError(t, os.MkdirAll(filepath.Join(allowed, "sub"), 0o755))
	require.NoError(t, os.Symlink(root, filepath.Join(top, "link-to-root")))
	require.NoError(t, os.Symlink(filepath.Join(allowed, "sub"), filepath.Join(top, "link-to-allowed")))
	b, err := New(WithBundleRoot(root), WithBindSources(allowed))
	require.NoError(t, err)
	loc := b.locate()
	bind := func(src string) *cellos.CellSpec {
		return &cellos.CellSpec{ID: "p", Run: cellos.RunSpec{Argv: []string{"x"}},
			Mounts: []cellos.MountSpec{{Type: cellos.MountBind, Source: src, Destination: "/d"}}}
	}
	for _, src := range []string{root, filepath.Join(root, "cell"), top, "/", filepath.Join(top, "link-to-root"),
		netcell.NetnsDir, "/proc", "/sys/fs", "/dev", loc.runsc.Root} {
		_, err := b.checkPolicy(bind(src), loc)
		require.ErrorIs(t, err, cellos.ErrInvalidSpec, src)
		assert.Equal(t, []string{"spec.mounts[0].source"}, cellos.Fields(err), src)
	}
	_, err = b.checkPolicy(bind("/usr"), loc)
	assert.ErrorContains(t, err, "WithBindSources", "outside the allowed prefixes")
	sources, err := b.checkPolicy(bind(filepath.Join(top, "link-to-allowed")), loc)
	require.NoError(t, err)
	assert.Equal(t, map[int]string{0: filepath.Join(allowed, "sub")}, sources, "config.json names the resolved source")

	s := bind(filepath.Join(allowed, "sub"))
	s.Rootfs = &cellos.RootfsSpec{Path: "/"}
	_, err = b.checkPolicy(s, loc)
	assert.Equal(t, []string{"spec.rootfs.path"}, cellos.Fields(err), "an image root of / would show the bundle root")

	s = bind(filepath.Join(allowed, "sub"))
	s.Run.User = &cellos.UserSpec{UID: 0, GID: 0}
	_, err = b.checkPolicy(s, loc)
	assert.Equal(t, []string{"spec.run.user"}, cellos.Fields(err))
	s.Run.User = &cellos.UserSpec{UID: 1000, GID: 0}
	_, err = b.checkPolicy(s, loc)
	assert.Equal(t, []string{"spec.run.user"}, cellos.Fields(err), "gid 0 too")
}

// The default bundle root is off the shared /tmp wherever a safer place exists; TMPDIR, when set,
// keeps its documented meaning.
func TestDefaultBundleRoot(t *testing.T) {
	t.Setenv("TMPDIR", "/var/tmp/x")
	assert.Equal(t, "/var/tmp/x/cellos-gvisor", DefaultBundleRoot())
	t.Setenv("TMPDIR", "")
	if os.Geteuid() == 0 {
		assert.Equal(t, "/run/cellos-gvisor", DefaultBundleRoot())
	} else {
		t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
		assert.Equal(t, "/run/user/1000/cellos-gvisor", DefaultBundleRoot())
	}
	b, err := New()
	require.NoError(t, err)
	t.Setenv(EnvBundleRoot, "")
	assert.Equal(t, DefaultBundleRoot(), b.locate().root)
}

// An image root's overlay is mounted nosuid and nodev: a setuid binary or a device node of the
// image means nothing on the host.
func TestImageOverlayNosuidNodev(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	image := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(image, "f"), []byte("x"), 0o4755))
	root := ownedDir(t, t.TempDir())
	cell, err := root.Mkdir("c", 0o700)
	require.NoError(t, err)
	defer cell.Close()
	rootfs, err := cell.Mkdir(bundle.Rootfs, 0o755)
	require.NoError(t, err)
	_ = rootfs.Close()
	require.NoError(t, bundle.MountImage(cell, image))
	t.Cleanup(func() { assert.NoError(t, bundle.Remove(root, "c")) })
	var st unix.Statfs_t
	require.NoError(t, unix.Statfs(filepath.Join(cell.Path(), bundle.Rootfs), &st))
	assert.NotZero(t, st.Flags&unix.ST_NOSUID, "nosuid")
	assert.NotZero(t, st.Flags&unix.ST_NODEV, "nodev")
}
