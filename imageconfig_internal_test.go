package gvisor

import (
	"os"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

const testPasswd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
const testGroup = "root:x:0:\napp:x:1001:\nstaff:x:50:\n"

// testLayers makes layer directories from maps of relative name → content ("" makes a directory).
func testLayers(t *testing.T, layers ...map[string]string) []string {
	var out []string
	for i, files := range layers {
		d := filepath.Join(t.TempDir(), "l", string(rune('a'+i)))
		require.NoError(t, os.MkdirAll(d, 0o755))
		for name, body := range files {
			p := filepath.Join(d, name)
			require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
			if body == "" {
				require.NoError(t, os.MkdirAll(p, 0o755))
			} else {
				require.NoError(t, os.WriteFile(p, []byte(body), 0o644))
			}
		}
		out = append(out, d)
	}
	return out
}

func TestImageRunPrecedence(t *testing.T) {
	layers := testLayers(t, map[string]string{"etc/passwd": testPasswd, "etc/group": testGroup})
	cfg := v1.Config{Entrypoint: []string{"/bin/ep"}, Cmd: []string{"a", "b"}, Env: []string{"PATH=/image/bin", "A=image", "B=image"},
		WorkingDir: "/srv", User: "app"}

	r, err := imageRun(cellos.RunSpec{}, cfg, layers, "img")
	require.NoError(t, err)
	assert.Equal(t, []string{"/bin/ep", "a", "b"}, r.Argv, "entrypoint then cmd")
	assert.Equal(t, map[string]string{"PATH": "/image/bin", "A": "image", "B": "image", "HOME": "/home/app"}, r.Env)
	assert.Equal(t, "/srv", r.WorkingDir)
	assert.Equal(t, &cellos.UserSpec{UID: 1000, GID: 1001}, r.User)

	doc := cellos.RunSpec{Argv: []string{"/bin/mine"}, Env: map[string]string{"B": "doc", "HOME": "/h"}, WorkingDir: "/w",
		User: &cellos.UserSpec{UID: 7, GID: 8}}
	r, err = imageRun(doc, cfg, layers, "img")
	require.NoError(t, err)
	assert.Equal(t, []string{"/bin/mine"}, r.Argv, "the document's argv replaces entrypoint and cmd")
	assert.Equal(t, map[string]string{"PATH": "/image/bin", "A": "image", "B": "doc", "HOME": "/h"}, r.Env)
	assert.Equal(t, "/w", r.WorkingDir)
	assert.Equal(t, &cellos.UserSpec{UID: 7, GID: 8}, r.User)
	_, had := doc.Env["A"]
	assert.False(t, had, "the document is not changed")
}

func TestImageRunDefaults(t *testing.T) {
	r, err := imageRun(cellos.RunSpec{}, v1.Config{Cmd: []string{"/bin/sh"}}, testLayers(t, map[string]string{"etc/passwd": testPasswd}), "img")
	require.NoError(t, err)
	assert.Equal(t, &cellos.UserSpec{UID: cellos.DefaultUID, GID: cellos.DefaultGID}, r.User, "no User: the library's default, not root")
	assert.Equal(t, "/nonexistent", r.Env["HOME"])
	assert.Empty(t, r.WorkingDir, "left to the document's default")

	_, err = imageRun(cellos.RunSpec{}, v1.Config{}, nil, "img")
	var fe cellos.FieldError
	require.ErrorAs(t, err, &fe)
	assert.Equal(t, "spec.run.argv", fe.Field)
	assert.Contains(t, fe.Reason, "neither Entrypoint nor Cmd")
}

func TestImageUserForms(t *testing.T) {
	layers := testLayers(t, map[string]string{"etc/passwd": testPasswd, "etc/group": testGroup})
	for _, c := range []struct {
		spec     string
		uid, gid uint32
	}{
		{"app", 1000, 1001}, {"1000", 1000, 1001}, {"app:staff", 1000, 50}, {"1000:50", 1000, 50},
		{"4242", 4242, 0}, // a lone uid without an entry: group 0, as docker
		{"4242:4243", 4242, 4243},
	} {
		r, err := imageRun(cellos.RunSpec{}, v1.Config{Cmd: []string{"x"}, User: c.spec}, layers, "img")
		require.NoError(t, err, c.spec)
		assert.Equal(t, &cellos.UserSpec{UID: c.uid, GID: c.gid}, r.User, c.spec)
	}
	for _, c := range []struct{ spec, msg string }{
		{"root", "runs as root"}, {"0", "runs as root"}, {"0:0", "runs as root"},
		{"ghost", "ghost"}, {"app:nogroup", "nogroup"},
	} {
		_, err := imageRun(cellos.RunSpec{}, v1.Config{Cmd: []string{"x"}, User: c.spec}, layers, "img")
		var fe cellos.FieldError
		require.ErrorAs(t, err, &fe, c.spec)
		assert.Equal(t, "spec.run.user", fe.Field)
		assert.Contains(t, fe.Reason, c.msg)
	}
	// The document may still ask for root.
	r, err := imageRun(cellos.RunSpec{User: &cellos.UserSpec{}}, v1.Config{Cmd: []string{"x"}, User: "root"}, layers, "img")
	require.NoError(t, err)
	assert.Equal(t, &cellos.UserSpec{}, r.User)
	assert.Equal(t, "/root", r.Env["HOME"])
}

func TestReadImageFileFollowsOverlayRules(t *testing.T) {
	lower := map[string]string{"etc/passwd": "lower\n", "etc/group": "lower-group\n"}
	t.Run("upper wins", func(t *testing.T) {
		ls := testLayers(t, lower, map[string]string{"etc/passwd": "upper\n"})
		got, err := readImageFile(ls, "etc/passwd")
		require.NoError(t, err)
		assert.Equal(t, "upper\n", string(got))
		got, err = readImageFile(ls, "etc/group")
		require.NoError(t, err)
		assert.Equal(t, "lower-group\n", string(got), "found below a layer without it")
	})
	t.Run("whiteout", func(t *testing.T) {
		ls := testLayers(t, lower, map[string]string{"etc": ""})
		require.NoError(t, unix.Mknod(filepath.Join(ls[1], "etc/passwd"), unix.S_IFCHR, 0))
		got, err := readImageFile(ls, "etc/passwd")
		require.NoError(t, err)
		assert.Nil(t, got)
	})
	t.Run("opaque directory", func(t *testing.T) {
		ls := testLayers(t, lower, map[string]string{"etc/passwd": "upper\n"})
		require.NoError(t, unix.Setxattr(filepath.Join(ls[1], "etc"), "trusted.overlay.opaque", []byte("y"), 0))
		got, err := readImageFile(ls, "etc/group")
		require.NoError(t, err)
		assert.Nil(t, got, "the opaque etc hides the lower layer's group")
	})
	t.Run("symlink is no file", func(t *testing.T) {
		secret := filepath.Join(t.TempDir(), "secret")
		require.NoError(t, os.WriteFile(secret, []byte("host secret\n"), 0o644))
		ls := testLayers(t, map[string]string{"etc": ""})
		require.NoError(t, os.Symlink(secret, filepath.Join(ls[0], "etc/passwd")))
		got, err := readImageFile(ls, "etc/passwd")
		require.NoError(t, err)
		assert.Nil(t, got)
		ls = testLayers(t, map[string]string{})
		require.NoError(t, os.Symlink(filepath.Dir(secret), filepath.Join(ls[0], "etc")))
		got, err = readImageFile(ls, "etc/secret")
		require.NoError(t, err)
		assert.Nil(t, got)
	})
	t.Run("a FIFO does not block", func(t *testing.T) {
		ls := testLayers(t, map[string]string{"etc": ""})
		require.NoError(t, unix.Mkfifo(filepath.Join(ls[0], "etc/passwd"), 0o644))
		got, err := readImageFile(ls, "etc/passwd")
		require.NoError(t, err)
		assert.Nil(t, got)
	})
	t.Run("bounded", func(t *testing.T) {
		ls := testLayers(t, map[string]string{"etc/passwd": string(make([]byte, maxImageFile+1))})
		_, err := readImageFile(ls, "etc/passwd")
		require.ErrorContains(t, err, "larger than")
	})
}

// TestReadImageFileClosesWhatItOpens: every descriptor opened on the way down a path is closed
// once (a descriptor closed twice may be another goroutine's by then).
func TestReadImageFileClosesWhatItOpens(t *testing.T) {
	ls := testLayers(t, map[string]string{"etc/passwd": testPasswd}, map[string]string{"etc/group": testGroup})
	count := func() int {
		es, err := os.ReadDir("/proc/self/fd")
		require.NoError(t, err)
		return len(es)
	}
	before := count()
	for range 20 {
		_, err := readImageFile(ls, "etc/passwd")
		require.NoError(t, err)
		_, err = readImageFile(ls, "etc/nosuch/deeper")
		require.NoError(t, err)
	}
	assert.Equal(t, before, count(), "descriptors leaked")
}
