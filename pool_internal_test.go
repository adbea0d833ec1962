package gvisor

import (
	"os"
	"strings"
	"testing"

	"github.com/cellos/cellos-host-gvisor/internal/pool"
	"github.com/cellos/cellos-host-gvisor/internal/shim"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
)

func TestWarmProfile(t *testing.T) {
	base := func() *cellos.CellSpec {
		return &cellos.CellSpec{ID: "x", Run: cellos.RunSpec{Argv: []string{"/bin/true"}}}
	}
	no := false
	cases := map[string]struct {
		change func(s *cellos.CellSpec)
		warm   bool
	}{
		"default": {func(*cellos.CellSpec) {}, true},
		"ttl and labels": {func(s *cellos.CellSpec) {
			s.Lifetime = &cellos.LifetimeSpec{TTLSeconds: 5}
			s.Labels = map[string]string{"a": "b"}
		}, true},
		"user, env, cwd":  {func(s *cellos.CellSpec) { s.Run.User = &cellos.UserSpec{UID: 0, GID: 0}; s.Run.WorkingDir = "/tmp" }, true},
		"empty resources": {func(s *cellos.CellSpec) { s.Resources = &cellos.ResourceSpec{} }, true},
		"no egress":       {func(s *cellos.CellSpec) { s.Network = &cellos.NetworkSpec{} }, true},
		"memory":          {func(s *cellos.CellSpec) { s.Resources = &cellos.ResourceSpec{MemoryBytes: 64 << 20} }, false},
		"cpu":             {func(s *cellos.CellSpec) { s.Resources = &cellos.ResourceSpec{CPUMillis: 100} }, false},
		"rootfs":          {func(s *cellos.CellSpec) { s.Rootfs = &cellos.RootfsSpec{Path: "/srv/img"} }, false},
		"mount": {func(s *cellos.CellSpec) {
			s.Mounts = []cellos.MountSpec{{Type: cellos.MountTmpfs, Destination: "/s", ReadOnly: &no}}
		}, false},
		"egress": {func(s *cellos.CellSpec) {
			s.Network = &cellos.NetworkSpec{Egress: []cellos.EgressRule{{CIDR: "10.0.0.0/8", Port: 1, Protocol: "tcp"}}}
		}, false},
		"the idle init uid": {func(s *cellos.CellSpec) { s.Run.User = &cellos.UserSpec{UID: WarmPoolIdleUID, GID: 1} }, false},
	}
	for name, c := range cases {
		s := base()
		c.change(s)
		assert.Equal(t, c.warm, pool.Fits(s, cgroups.Limits{}), name)
	}
}

// The workload's process file names every capability set, empty, and no new privileges.
func TestPooledProcessFile(t *testing.T) {
	doc := &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
		Spec: cellos.CellSpec{ID: "x", Run: cellos.RunSpec{Argv: []string{"/bin/true"}}}}
	dir := t.TempDir()
	b, err := New(WithBundleRoot(dir))
	assert.NoError(t, err)
	e := &pool.Entry{Path: dir, Dir: ownedDir(t, dir), RunscID: runsc.PoolIDPrefix + strings.Repeat("a", runsc.PoolNameLen)}
	for _, d := range []string{"rootfs", "rootfs/etc"} {
		assert.NoError(t, mkdir(dir+"/"+d))
	}
	assert.NoError(t, os.WriteFile(dir+"/"+bundle.Config, []byte("{}"), 0o644))
	c := b.newCell("x", b.locate())
	cfg := shim.Config{CellID: "x", RunscID: e.RunscID, Runsc: *c.runsc, Pool: true,
		Flags: runsc.CellFlags{Log: c.paths.bundle + "/runsc.log", IgnoreCgroups: true, Overlay: "none"}}
	cfg.Runsc.Rootless = false
	assert.NoError(t, b.writePooledCell(e, doc, cfg))
	var p map[string]any
	assert.NoError(t, readJSON(dir+"/"+bundle.Process, &p))
	assert.Equal(t, map[string]any{"bounding": []any{}, "effective": []any{}, "inheritable": []any{}, "permitted": []any{}, "ambient": []any{}}, p["capabilities"])
	assert.Equal(t, true, p["noNewPrivileges"])
	assert.Equal(t, map[string]any{"uid": float64(65534), "gid": float64(65534)}, p["user"])
	assert.True(t, bundle.HasMarker(e.Dir, "x"))
}

// A cell's runsc id in a pool sandbox comes from its bundle directory: the same directory, moved,
// gives the same id; another directory another one.
func TestPoolRunscIDFromDirectory(t *testing.T) {
	root := t.TempDir()
	a := ownedDir(t, root+"/a")
	dev, ino := a.Ident()
	id := runsc.PoolID(root, dev, ino)
	assert.True(t, runsc.IsPoolID(id))
	require.NoError(t, os.Rename(root+"/a", root+"/moved"))
	moved := ownedDir(t, root+"/moved")
	dev2, ino2 := moved.Ident()
	assert.Equal(t, id, runsc.PoolID(root, dev2, ino2))
	other := ownedDir(t, root+"/b")
	dev3, ino3 := other.Ident()
	assert.NotEqual(t, id, runsc.PoolID(root, dev3, ino3))
	assert.NotEqual(t, id, runsc.PoolID(root+"x", dev, ino), "the bundle root is part of it")
}

func mkdir(p string) error { return os.Mkdir(p, 0o755) }
