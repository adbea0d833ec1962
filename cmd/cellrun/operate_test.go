package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/testkit"
)

// requireRunsc skips without runsc, unless CELLOS_REQUIRE_RUNSC=1 makes that a failure.
func requireRunsc(t *testing.T) { testkit.Runsc(t) }

// runCLI runs cellrun with args and returns its exit code and output.
func runCLI(args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := run(args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func shDoc(id, script string) *cellos.ExecutionCellDocument {
	return &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
		Spec: cellos.CellSpec{ID: id, Run: cellos.RunSpec{Argv: []string{"/bin/sh", "-c", script}}}}
}

// TestOperateCLI drives a cell that a "supervisor" (a Backend of this test) created through
// cellrun's operator commands, which attach to it from another Backend.
func TestOperateCLI(t *testing.T) {
	requireRunsc(t)
	t.Parallel()
	root := t.TempDir()
	sup, err := gvisor.New(gvisor.WithBundleRoot(root))
	require.NoError(t, err)
	ctx := context.Background()
	h, err := sup.Create(ctx, shDoc("op-cli", `trap 'echo bye; exit 9' TERM; echo up; while :; do sleep 0.1; done`))
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = sup.Destroy(ctx, h) })
	require.Eventually(t, func() bool {
		data, _ := os.ReadFile(filepath.Join(root, "op-cli", "stdout.log"))
		return string(data) == "up\n"
	}, 20*time.Second, 10*time.Millisecond)
	flag := "--bundle-root=" + root

	code, out, errOut := runCLI("exec", flag, "--user", "1000:1001", "--env", "A=b", "op-cli", "--", "/bin/sh", "-c", `echo "$A $(id -u):$(id -g)"; exit 3`)
	assert.Equal(t, 3, code, errOut)
	assert.Equal(t, "b 1000:1001\n", out)

	code, out, errOut = runCLI(flag, "stats", "op-cli")
	require.Equal(t, 0, code, errOut)
	var st gvisor.Stats
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.NotZero(t, st.MemoryBytes)
	assert.NotZero(t, st.Pids)

	code, _, errOut = runCLI(flag, "pause", "op-cli")
	require.Equal(t, 0, code, errOut)
	code, out, _ = runCLI("list", flag)
	require.Equal(t, 0, code)
	assert.Regexp(t, `(?m)^op-cli\s+paused\s*$`, out)
	code, _, errOut = runCLI("resume", flag, "op-cli")
	require.Equal(t, 0, code, errOut)

	code, _, errOut = runCLI("kill", flag, "op-cli", "TERM")
	require.Equal(t, 0, code, errOut)
	status, err := sup.WaitForExit(ctx, h.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 9, Reason: cellos.ExitExited}, status)
	code, out, _ = runCLI("list", flag)
	require.Equal(t, 0, code)
	assert.Regexp(t, `(?m)^op-cli\s+exited\s+exited 9\s*$`, out)

	code, _, errOut = runCLI("exec", flag, "op-cli", "--", "/bin/true")
	assert.Equal(t, exitFailure, code)
	assert.Contains(t, errOut, "not running")
	code, _, errOut = runCLI("stats", flag, "op-nosuch")
	assert.Equal(t, exitFailure, code)
	assert.Contains(t, errOut, "not tracked")
	code, _, _ = runCLI("signal", flag, "op-cli", "NOSUCH") // the alias
	assert.Equal(t, exitFailure, code)
	code, _, _ = runCLI("stats", flag)
	assert.Equal(t, 2, code)

	code, _, errOut = runCLI(flag, "delete", "op-cli")
	require.Equal(t, 0, code, errOut)
	entries, _ := os.ReadDir(root)
	for _, en := range entries {
		assert.Equal(t, ".runsc", en.Name())
	}
}

func TestOperateCLICheckpointRestore(t *testing.T) {
	requireRunsc(t)
	t.Parallel()
	root := t.TempDir()
	sup, err := gvisor.New(gvisor.WithBundleRoot(root))
	require.NoError(t, err)
	ctx := context.Background()
	script := `n=0; while [ $n -lt 30 ]; do n=$((n+1)); echo $n; sleep 0.05; done; exit 7`
	h, err := sup.Create(ctx, shDoc("op-cli-src", script))
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = sup.Destroy(ctx, h) })
	require.Eventually(t, func() bool {
		data, _ := os.ReadFile(filepath.Join(root, "op-cli-src", "stdout.log"))
		return strings.Contains(string(data), "\n3\n")
	}, 20*time.Second, 10*time.Millisecond)
	image := filepath.Join(t.TempDir(), "image")
	code, _, errOut := runCLI("checkpoint", "--bundle-root="+root, "op-cli-src", image)
	require.Equal(t, 0, code, errOut)
	_, err = sup.WaitForExit(ctx, h.CellID)
	require.ErrorIs(t, err, gvisor.ErrCheckpointed)
	data, err := os.ReadFile(filepath.Join(root, "op-cli-src", "stdout.log"))
	require.NoError(t, err)
	before := strings.Fields(string(data))

	docFile := filepath.Join(t.TempDir(), "dst.json")
	raw, err := json.Marshal(shDoc("op-cli-dst", script))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(docFile, raw, 0o644))
	code, out, errOut := runCLI("restore", "--bundle-root="+root, docFile, image)
	assert.Equal(t, 7, code, errOut)
	after := strings.Fields(out)
	require.NotEmpty(t, after, errOut)
	var want []string
	for i := 1; i <= 30; i++ {
		want = append(want, strconv.Itoa(i))
	}
	assert.Equal(t, want, append(before, after...), "the count goes on where the checkpoint left it, no line lost or repeated")
	assert.Contains(t, errOut, "teardown: destroyed")
}
