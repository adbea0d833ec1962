package gvisor

import (
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

func TestOperateExecProcess(t *testing.T) {
	cell := &specs.Process{
		User: specs.User{UID: 65534, GID: 65534},
		Args: []string{"/bin/sh", "-c", "sleep 60"},
		Env:  []string{"LANG=C.UTF-8", "PATH=/usr/bin:/bin", "SHARED=cell"},
		Cwd:  "/work",
	}
	p := execProcess(cell, cellos.RunSpec{Argv: []string{"/bin/id"}})
	assert.Equal(t, []string{"/bin/id"}, p.Args)
	assert.Equal(t, cell.Env, p.Env)
	assert.Equal(t, "/work", p.Cwd)
	assert.Equal(t, specs.User{UID: 65534, GID: 65534}, p.User)
	assert.True(t, p.NoNewPrivileges)
	require.NotNil(t, p.Capabilities)
	for _, set := range [][]string{p.Capabilities.Bounding, p.Capabilities.Effective, p.Capabilities.Inheritable, p.Capabilities.Permitted, p.Capabilities.Ambient} {
		assert.NotNil(t, set, "an empty set, not an absent one (absent leaves runsc's defaults)")
		assert.Empty(t, set)
	}

	p = execProcess(cell, cellos.RunSpec{Argv: []string{"/bin/id"}, WorkingDir: "/", User: &cellos.UserSpec{UID: 0, GID: 10},
		Env: map[string]string{"SHARED": "exec", "B": "2", "A": "1"}})
	assert.Equal(t, []string{"LANG=C.UTF-8", "PATH=/usr/bin:/bin", "SHARED=exec", "A=1", "B=2"}, p.Env)
	assert.Equal(t, "/", p.Cwd)
	assert.Equal(t, specs.User{UID: 0, GID: 10}, p.User)
	assert.Equal(t, []string{"/bin/sh", "-c", "sleep 60"}, cell.Args, "the cell's process is not modified")
}

func TestOperateDescendantsOf(t *testing.T) {
	procs := map[int]int{1: 0, 2: 1, 3: 2, 4: 1}
	assert.Equal(t, []int{3}, descendantsOf(procs, 2))
	assert.Equal(t, []int{2, 4, 3}, descendantsOf(procs, 1))
	assert.Empty(t, descendantsOf(procs, 4))
}
