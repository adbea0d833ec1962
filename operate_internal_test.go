package gvisor

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// Outputs of Debian's runsc (0.0~20221219), as the fake below prints them.
const (
	debianState  = `{"ociVersion":"1.0.2-dev","id":"cellos-x","status":"paused","pid":14098,"bundle":"/b/c1","annotations":{"cellos.dev/cell-id":"c1"}}`
	debianEvents = `{"type":"stats","id":"cellos-x","data":{"cpu":{"usage":{"total":1247937798486}},"memory":{"usage":{"limit":0,"usage":2514944,"failcnt":0},"swap":{"limit":0,"failcnt":0},"kernel":{"limit":0,"failcnt":0},"kernelTCP":{"limit":0,"failcnt":0}},"pids":{"current":2}}}`
	debianPs     = "UID       PID       PPID      C         TTY       STIME     TIME      CMD\n" +
		"65534     1         0         4         ?         12:45     20ms      sh\n" +
		"65534     2         1         9         ?         12:45     60ms      sh\n" +
		"65534     3         2         5         ?         12:45     40ms      sleep\n" +
		"65534     4         1         5         ?         12:45     40ms      sleep\n"
)

// fakeRunsc writes a runsc stand-in that records each argv on a line of the returned log and
// answers state, events and ps as Debian's runsc does.
func fakeRunsc(t *testing.T) (path, log string) {
	t.Helper()
	dir := t.TempDir()
	path, log = filepath.Join(dir, "runsc"), filepath.Join(dir, "argv.log")
	for name, content := range map[string]string{"state": debianState, "events": debianEvents, "ps": debianPs} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name+".out"), []byte(content), 0o644))
	}
	script := `#!/bin/sh
echo "$*" >> '` + log + `'
for a; do
	case "$a" in state|events|ps) cat '` + dir + `'/"$a".out; exit 0;; esac
done
`
	require.NoError(t, os.WriteFile(path, []byte(script), 0o755))
	return path, log
}

func TestOperateRunscArgv(t *testing.T) {
	path, log := fakeRunsc(t)
	r := &runsc.Runsc{Path: path, Root: "/state", Platform: "ptrace", Extra: []string{"--debug"}}
	ctx := context.Background()
	const id = "cellos-0123456789abcdef01234567"

	st, err := r.State(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, ContainerState{ID: "cellos-x", Pid: 14098, Status: "paused", Bundle: "/b/c1"}, st)
	require.NoError(t, r.Pause(ctx, id))
	require.NoError(t, r.Resume(ctx, id))
	require.NoError(t, r.Kill(ctx, id, "15"))
	require.NoError(t, r.KillProcess(ctx, id, 7, "KILL"))
	require.NoError(t, r.Checkpoint(ctx, id, "/images/one"))
	ss, err := r.Stats(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, uint64(2514944), ss.Memory.Usage.Usage)
	assert.Equal(t, uint64(2), ss.Pids.Current)
	procs, err := r.Processes(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, map[int]int{1: 0, 2: 1, 3: 2, 4: 1}, procs)

	data, err := os.ReadFile(log)
	require.NoError(t, err)
	g := "--root /state --platform=ptrace --debug "
	assert.Equal(t, []string{
		g + "state " + id,
		g + "pause " + id,
		g + "resume " + id,
		g + "kill " + id + " 15",
		g + "kill --pid 7 " + id + " KILL",
		g + "checkpoint --image-path /images/one " + id,
		g + "events --stats " + id,
		g + "ps " + id,
	}, strings.Split(strings.TrimSpace(string(data)), "\n"))

	flags := runsc.CellFlags{Log: "/b/exec-1/runsc.log", IgnoreCgroups: true, Overlay: "none"}
	assert.Equal(t, strings.Fields("--root /state --log /b/exec-1/runsc.log --log-format=json --platform=ptrace --network=none --ignore-cgroups --overlay2=none --debug "+
		"exec --process /b/exec-1/process.json --internal-pid-file /b/exec-1/pid "+id),
		r.ExecArgs(flags, id, "/b/exec-1/process.json", "/b/exec-1/pid"))
}

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
