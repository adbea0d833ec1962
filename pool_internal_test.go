package gvisor

import (
	"os"
	"path/filepath"
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

// Pool sandboxes' runsc ids and cells' ids are never prefixes of one another (runsc matches ids
// by prefix), and a pool directory's name is never a cell id.
func TestPoolIDsNeverPrefixes(t *testing.T) {
	poolID := runsc.PoolIDPrefix + strings.Repeat("0", runsc.PoolNameLen)
	assert.True(t, runsc.IsPoolID(poolID))
	for _, id := range []string{"a", "cell", "pool", "0", strings.Repeat("f", 64)} {
		cell := RunscID("/var/lib/cellos", id)
		assert.False(t, strings.HasPrefix(poolID, cell), id)
		assert.False(t, strings.HasPrefix(cell, poolID), id)
		assert.False(t, runsc.IsPoolID(cell), id)
	}
	assert.False(t, cellos.ValidID(pool.DirName))
	assert.False(t, runsc.IsPoolID(runsc.PoolIDPrefix+"0123"), "short")
	assert.False(t, runsc.IsPoolID(runsc.PoolIDPrefix+strings.Repeat("G", runsc.PoolNameLen)), "not hex")
}

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

func TestStateIDsFromFileNames(t *testing.T) {
	dir := t.TempDir()
	cold := RunscID("/b", "c1")
	poolID := runsc.PoolIDPrefix + "0123456789abcdef01234567"
	for _, f := range []string{cold + ".state", cold + ".lock", poolID + "_sandbox:" + poolID + ".lock", runsc.NullNetNS} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), nil, 0o600))
	}
	r := &runsc.Runsc{Root: dir}
	ids, other := r.StateIDs()
	assert.Equal(t, map[string]bool{cold: true, poolID: true}, ids)
	assert.False(t, other)

	for _, f := range []string{"foreign.state", "cellos-short.state", "cellos-" + "zz23456789abcdef01234567.state"} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), nil, 0o600))
		_, other = r.StateIDs()
		assert.True(t, other, f)
		require.NoError(t, os.Remove(filepath.Join(dir, f)))
	}

	// Lone locks of a poolID sandbox go without runsc (there is none here to call).
	require.NoError(t, pool.RemoveSandbox(&runsc.Runsc{Root: dir}, poolID))
	ids, _ = r.StateIDs()
	assert.Equal(t, map[string]bool{cold: true}, ids)
}
