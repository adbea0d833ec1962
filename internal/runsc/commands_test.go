package runsc

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
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

func TestCommandArgv(t *testing.T) {
	path, log := fakeRunsc(t)
	r := &Runsc{Path: path, Root: "/state", Platform: "ptrace", Extra: []string{"--debug"}}
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

	flags := CellFlags{Log: "/b/exec-1/runsc.log", IgnoreCgroups: true, Overlay: "none"}
	assert.Equal(t, strings.Fields("--root /state --log /b/exec-1/runsc.log --log-format=json --platform=ptrace --network=none --ignore-cgroups --overlay2=none --debug "+
		"exec --process /b/exec-1/process.json --internal-pid-file /b/exec-1/pid "+id),
		r.ExecArgs(flags, id, "/b/exec-1/process.json", "/b/exec-1/pid"))
}
