package imagetest

import (
	"archive/tar"
	"bytes"
	"io"
	"log"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func nopLogger() *log.Logger { return log.New(io.Discard, "", 0) }

// Entry is one tar entry of a layer: a header and, for a regular file, its content.
type Entry struct {
	Header *tar.Header
	Body   []byte
}

var epoch = time.Unix(1700000000, 0)

// File is a regular file entry.
func File(name, body string, mode int64) Entry {
	return Entry{Header: &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(body)), ModTime: epoch}, Body: []byte(body)}
}

// Dir is a directory entry.
func Dir(name string, mode int64) Entry {
	return Entry{Header: &tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: epoch}}
}

// Symlink is a symbolic link entry.
func Symlink(name, target string) Entry {
	return Entry{Header: &tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: epoch}}
}

// Tar is the tar stream of entries.
func Tar(t testing.TB, entries ...Entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := *e.Header
		if h.Typeflag == tar.TypeReg && h.Size == 0 {
			h.Size = int64(len(e.Body))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %q: %v", h.Name, err)
		}
		if _, err := tw.Write(e.Body); err != nil {
			t.Fatalf("tar entry %q: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// Layer is a gzip-compressed layer of entries.
func Layer(t testing.TB, entries ...Entry) v1.Layer {
	t.Helper()
	data := Tar(t, entries...)
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// LayerWithMediaType is Layer with another media type (the blob is still gzip).
func LayerWithMediaType(t testing.TB, mt types.MediaType, entries ...Entry) v1.Layer {
	t.Helper()
	data := Tar(t, entries...)
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil }, tarball.WithMediaType(mt))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// RandomLayer is a layer holding one file of size random (incompressible) bytes.
func RandomLayer(t testing.TB, size int) v1.Layer {
	t.Helper()
	body := make([]byte, size)
	r := rand.New(rand.NewPCG(uint64(size), 7))
	for i := range body {
		body[i] = byte(r.Uint32())
	}
	return Layer(t, File("random", string(body), 0o644))
}

// Image is an image of cfg and layers, lowest first.
func Image(t testing.TB, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{Architecture: runtime.GOARCH, OS: "linux", Config: cfg,
		RootFS: mustRootFS(t, img)})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func mustRootFS(t testing.TB, img v1.Image) v1.RootFS {
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	return cf.RootFS
}

// Layout writes img into an OCI image layout at dir, tagged tag.
func Layout(t testing.TB, dir, tag string, img v1.Image) {
	t.Helper()
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": tag})); err != nil {
		t.Fatal(err)
	}
}

// Passwd is the /etc/passwd of the test images: root, app (1000:1000) and nobody.
const Passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"

// Group is the test images' /etc/group.
const Group = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"

// busyboxApplets are the applets linked in the busybox image.
var busyboxApplets = []string{"sh", "echo", "cat", "id", "grep", "awk", "tr", "sort", "wc", "test", "touch", "ls", "pwd", "sleep", "rm", "mkdir", "true", "false", "env", "head", "printf"}

// BusyboxLayer is one layer: the host's static busybox as /bin/busybox, its applets as hard
// links, /etc/passwd and /etc/group, an empty /tmp, /home/app.
func BusyboxLayer(t testing.TB) v1.Layer {
	t.Helper()
	bin, err := os.ReadFile("/bin/busybox")
	if err != nil {
		missing(t, "/bin/busybox (package busybox-static)")
	}
	entries := []Entry{Dir("bin", 0o755), File("bin/busybox", string(bin), 0o755)}
	for _, a := range busyboxApplets {
		entries = append(entries, Entry{Header: &tar.Header{Typeflag: tar.TypeLink, Name: "bin/" + a, Linkname: "bin/busybox", ModTime: epoch}})
	}
	entries = append(entries, Dir("etc", 0o755), File("etc/passwd", Passwd, 0o644), File("etc/group", Group, 0o644),
		Dir("tmp", 0o1777), Dir("home", 0o755),
		Entry{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "home/app", Mode: 0o755, Uid: 1000, Gid: 1000, ModTime: epoch}},
		Dir("srv", 0o755))
	return Layer(t, entries...)
}

// Busybox is an image of BusyboxLayer that says hello.
func Busybox(t testing.TB) v1.Image {
	t.Helper()
	return Image(t, v1.Config{Cmd: []string{"/bin/sh", "-c", "echo hello from busybox"}, Env: []string{"PATH=/bin"}, WorkingDir: "/"},
		BusyboxLayer(t))
}

var lddPath = regexp.MustCompile(`(/\S+) \(0x`)

// Python is a ~50 MiB image of the host's python3 in three layers: its shared libraries, its
// standard library (without tests and caches), the interpreter.
func Python(t testing.TB) v1.Image {
	t.Helper()
	exe, err := filepath.EvalSymlinks("/usr/bin/python3")
	if err != nil {
		missing(t, "/usr/bin/python3")
	}
	ver := filepath.Base(exe) // python3.11
	stdlib := filepath.Join("/usr/lib", ver)
	libs := map[string]bool{}
	objects := []string{exe}
	dyn, _ := filepath.Glob(filepath.Join(stdlib, "lib-dynload", "*.so"))
	objects = append(objects, dyn...)
	for _, o := range objects {
		out, err := exec.Command("ldd", o).Output()
		if err != nil {
			continue
		}
		for _, m := range lddPath.FindAllStringSubmatch(string(out), -1) {
			libs[m[1]] = true
		}
	}
	var libEntries []Entry
	libEntries = append(libEntries, Symlink("lib", "usr/lib"), Symlink("lib64", "usr/lib64"))
	seen := map[string]bool{}
	for l := range libs {
		real, err := filepath.EvalSymlinks(l)
		if err != nil {
			continue
		}
		for _, p := range []string{l, real} {
			p = canonical(p)
			if seen[p] {
				continue
			}
			seen[p] = true
			libEntries = append(libEntries, hostEntries(t, p)...)
		}
	}
	var std []Entry
	err = filepath.WalkDir(stdlib, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		base := d.Name()
		if d.IsDir() && (base == "test" || base == "__pycache__" || base == "idlelib" || base == "tkinter" || base == "ensurepip" || base == "lib2to3") {
			return filepath.SkipDir
		}
		std = append(std, hostEntry(t, p, d))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	bin := append(hostEntries(t, exe), Symlink("usr/bin/python3", ver))
	return Image(t, v1.Config{Cmd: []string{"/usr/bin/python3"}, Env: []string{"PATH=/usr/bin:/bin"}},
		Layer(t, libEntries...), Layer(t, std...), Layer(t, bin...))
}

// canonical maps /lib and /lib64 paths to their /usr place (merged /usr).
func canonical(p string) string {
	for _, pre := range []string{"/lib/", "/lib64/"} {
		if strings.HasPrefix(p, pre) {
			return "/usr" + p
		}
	}
	return p
}

// hostEntries is the host file p (a file or a symlink) as an entry, with its parent directories.
func hostEntries(t testing.TB, p string) []Entry {
	t.Helper()
	var out []Entry
	dir := filepath.Dir(p)
	var parents []string
	for dir != "/" {
		parents = append([]string{dir}, parents...)
		dir = filepath.Dir(dir)
	}
	for _, d := range parents {
		out = append(out, Dir(strings.TrimPrefix(d, "/"), 0o755))
	}
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return append(out, hostEntry(t, p, fsInfo{fi}))
}

type fsInfo struct{ os.FileInfo }

func (f fsInfo) Type() os.FileMode          { return f.Mode().Type() }
func (f fsInfo) Info() (os.FileInfo, error) { return f.FileInfo, nil }

func hostEntry(t testing.TB, p string, d os.DirEntry) Entry {
	t.Helper()
	name := strings.TrimPrefix(p, "/")
	fi, err := d.Info()
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case d.IsDir():
		return Dir(name, int64(fi.Mode().Perm()))
	case d.Type()&os.ModeSymlink != 0:
		target, err := os.Readlink(p)
		if err != nil {
			t.Fatal(err)
		}
		return Symlink(name, target)
	default:
		body, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return File(name, string(body), int64(fi.Mode().Perm()))
	}
}
