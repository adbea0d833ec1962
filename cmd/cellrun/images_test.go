package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/imagetest"
)

// TestMain lets the tests run this package's test binary as cellrun itself, in a terminal:
// with CELLRUN_TEST_MAIN=1 it is cellrun, its arguments cellrun's.
func TestMain(m *testing.M) {
	if os.Getenv("CELLRUN_TEST_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// TestImagesCLI pulls, lists and removes an image with cellrun, its output in a pipe, and runs a
// cell from an image it pulls itself.
func TestImagesCLI(t *testing.T) {
	requireRunsc(t)
	t.Parallel()
	reg := imagetest.Serve(t)
	ref := reg.Push(t, "team/python", "1", imagetest.Python(t))
	store := filepath.Join(t.TempDir(), "images")
	g := []string{"--image-store", store, "--insecure-registry", reg.Host(), "--bundle-root", t.TempDir()}

	code, out, errOut := runCLI(append(g, "pull", ref)...)
	require.Equal(t, 0, code, errOut)
	assert.Regexp(t, `^`+ref+` sha256:[0-9a-f]{64}\n$`, out)
	assert.Contains(t, errOut, "pull "+ref+": 3 layers, ")
	for i := 1; i <= 3; i++ {
		assert.Contains(t, errOut, fmt.Sprintf("layer %d/3 ", i))
	}
	assert.Contains(t, errOut, "fetched and unpacked")
	assert.Contains(t, errOut, "pull "+ref+": done in ")
	assert.NotContains(t, errOut, "\r", "no progress bar in a pipe")

	code, _, errOut = runCLI(append(g, "pull", ref)...)
	require.Equal(t, 0, code, errOut)
	assert.Equal(t, 3, strings.Count(errOut, "already in the store"), errOut)

	code, out, _ = runCLI(append(g, "images")...)
	require.Equal(t, 0, code)
	assert.Regexp(t, `(?m)^REF\s+DIGEST\s+LAYERS\s+SIZE\s+PULLED\n`+strings.ReplaceAll(ref, ".", `\.`)+`\s+[0-9a-f]{12}\s+3\s+\d+\.\d MiB`, out)
	code, out, _ = runCLI(append(g, "images", "--json")...)
	require.Equal(t, 0, code)
	var imgs []map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &imgs))
	require.Len(t, imgs, 1)
	assert.Equal(t, ref, imgs[0]["ref"])

	// run pulls what the store lacks: a busybox image here, then runs its command.
	bb := reg.Push(t, "team/busybox", "1", imagetest.Busybox(t))
	d := &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
		Spec: cellos.CellSpec{ID: "img-cli", Rootfs: &cellos.RootfsSpec{Image: bb}}}
	data, err := json.Marshal(d)
	require.NoError(t, err)
	docPath := filepath.Join(t.TempDir(), "doc.json")
	require.NoError(t, os.WriteFile(docPath, data, 0o644))
	code, out, errOut = runCLI(append(g, "run", docPath)...)
	require.Equal(t, 0, code, errOut)
	assert.Equal(t, "hello from busybox\n", out)
	assert.Contains(t, errOut, "pull "+bb+": layer 1/1")

	code, out, errOut = runCLI(append(g, "rmi", ref, bb)...)
	require.Equal(t, 0, code, errOut)
	assert.Equal(t, "removed "+ref+"\nremoved "+bb+"\n", out)
	code, _, errOut = runCLI(append(g, "rmi", ref)...)
	assert.Equal(t, exitFailure, code)
	assert.Contains(t, errOut, "not found")
	code, out, errOut = runCLI(append(g, "image-prune")...)
	require.Equal(t, 0, code, errOut)
	assert.Regexp(t, `^deleted 4 layers and \d+ blobs, \d+\.\d MiB; kept 0 layers in use\n$`, out)
	layers, err := os.ReadDir(filepath.Join(store, "layers"))
	require.NoError(t, err)
	assert.Empty(t, layers)
}

// tmux drives a terminal: a session of its own, on a socket of its own.
type tmux struct {
	t      *testing.T
	socket string
}

func newTmux(t *testing.T) *tmux {
	if _, err := exec.LookPath("tmux"); err != nil {
		if os.Getenv("CELLOS_REQUIRE_RUNSC") == "1" {
			t.Fatal("tmux is missing; make deps installs it")
		}
		t.Skip("tmux is missing")
	}
	tm := &tmux{t: t, socket: filepath.Join(t.TempDir(), "tmux.sock")}
	t.Cleanup(func() { _ = exec.Command("tmux", "-S", tm.socket, "kill-server").Run() })
	return tm
}

func (tm *tmux) cmd(args ...string) string {
	tm.t.Helper()
	out, err := exec.Command("tmux", append([]string{"-S", tm.socket}, args...)...).CombinedOutput()
	require.NoError(tm.t, err, "tmux %v: %s", args, out)
	return string(out)
}

func (tm *tmux) screen() string { return tm.cmd("capture-pane", "-p", "-t", "cli") }

// waitFor waits until the screen shows what match accepts, and returns it.
func (tm *tmux) waitFor(what string, match func(string) bool) string {
	tm.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		s := tm.screen()
		if match(s) {
			return s
		}
		if time.Now().After(deadline) {
			tm.t.Fatalf("waiting for %s; the screen:\n%s", what, s)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestPullProgressOnATerminal pulls in a terminal (tmux) from a registry slowed down so that the
// progress bar shows, then Ctrl-C stops a pull half done, which leaves nothing behind.
func TestPullProgressOnATerminal(t *testing.T) {
	t.Parallel()
	tm := newTmux(t)
	reg := imagetest.Serve(t)
	ref := reg.Push(t, "team/python", "1", imagetest.Python(t))
	reg.Wrap(func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.Contains(r.URL.Path, "/blobs/") {
				w = &slowWriter{w}
			}
			h.ServeHTTP(w, r)
		})
	})
	store := filepath.Join(t.TempDir(), "images")
	exe, err := os.Executable()
	require.NoError(t, err)
	shell := fmt.Sprintf("CELLRUN_TEST_MAIN=1 %s --image-store %s --insecure-registry %s pull %s; echo EXIT=$?; sleep 600",
		exe, store, reg.Host(), ref)
	tm.cmd("new-session", "-d", "-s", "cli", "-x", "120", "-y", "20", shell)

	bar := regexp.MustCompile(`\d+% \|[^|]*\| \(\s*[1-9][\d.]*( [KM]iB)?/[\d.]+ MiB`) // bytes fetched of all
	s := tm.waitFor("a progress bar with bytes fetched", bar.MatchString)
	assert.Contains(t, s, ref+": layers ")
	tm.cmd("send-keys", "-t", "cli", "C-c")
	s = tm.waitFor("the end of the pull", func(s string) bool { return strings.Contains(s, "EXIT=") })
	assert.Contains(t, s, "EXIT=125")
	assert.Contains(t, s, "pull stopped: interrupt signal received")
	for _, d := range []string{"tmp", "layers", "refs"} {
		entries, err := os.ReadDir(filepath.Join(store, d))
		require.NoError(t, err)
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		if d == "layers" {
			continue // a layer that completed before Ctrl-C may stay: it is whole and verified
		}
		assert.Empty(t, names, "%s/ after an interrupted pull", d)
	}

	// Not slowed down, the same pull completes with the bar at 100%.
	reg.Wrap(nil)
	tm.cmd("kill-session", "-t", "cli")
	tm.cmd("new-session", "-d", "-s", "cli", "-x", "120", "-y", "20", shell)
	s = tm.waitFor("the pull to finish", func(s string) bool { return strings.Contains(s, "EXIT=") })
	assert.Contains(t, s, "EXIT=0")
	assert.Regexp(t, `layers 3/3 100% \|█+\| \([\d.]+/[\d.]+ MiB`, s)
	assert.Equal(t, 1, strings.Count(s, "100%"), "the bar completes once:\n%s", s)
	assert.Regexp(t, `\]\n`+regexp.QuoteMeta(ref)+` sha256:`, s, "the result on a line of its own")
}

// slowWriter writes at about 4 MiB/s.
type slowWriter struct{ http.ResponseWriter }

func (w *slowWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		c := min(len(p), 32<<10)
		m, err := w.ResponseWriter.Write(p[:c])
		n += m
		if err != nil {
			return n, err
		}
		if f, ok := w.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		time.Sleep(8 * time.Millisecond)
		p = p[c:]
	}
	return n, nil
}
