package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// entry is one tar entry of a test layer; body is the content of a regular
// file.
type entry struct {
	hdr  tar.Header
	body string
}

func file(name, body string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644}, body: body}
}

func dir(name string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755}}
}

func symlink(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}}
}

func hardlink(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target}}
}

func buildTar(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if h.ModTime.IsZero() {
			h.ModTime = time.Unix(1700000000, 0)
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("write header %q: %v", h.Name, err)
		}
		if e.body != "" {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// sentinel returns a layer directory parent/layer; checkSentinel asserts
// nothing was written into parent beside it.
func sentinel(t *testing.T) (parent, layer string) {
	t.Helper()
	parent = t.TempDir()
	layer = filepath.Join(parent, "layer")
	if err := os.Mkdir(layer, 0o755); err != nil {
		t.Fatal(err)
	}
	return parent, layer
}

func checkSentinel(t *testing.T, parent string) {
	t.Helper()
	ents, err := os.ReadDir(parent)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 || ents[0].Name() != "layer" {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("written outside the layer: %s holds %v", parent, names)
	}
}

func apply(t *testing.T, lim Limits, entries ...entry) (string, Stats, error) {
	t.Helper()
	parent, layer := sentinel(t)
	st, err := Apply(context.Background(), bytes.NewReader(buildTar(t, entries...)), layer, lim)
	checkSentinel(t, parent)
	return layer, st, err
}

func mustApply(t *testing.T, entries ...entry) string {
	t.Helper()
	layer, _, err := apply(t, Limits{}, entries...)
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return layer
}

func lstat(t *testing.T, p string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// wantUnsafe asserts err is an EntryError for name wrapping ErrUnsafe whose
// message contains reason.
func wantUnsafe(t *testing.T, err error, name, reason string) {
	t.Helper()
	if !errors.Is(err, ErrUnsafe) {
		t.Fatalf("error %v, want ErrUnsafe", err)
	}
	var ee *EntryError
	if !errors.As(err, &ee) || ee.Name != name {
		t.Fatalf("error %v, want an EntryError for %q", err, name)
	}
	if !strings.Contains(err.Error(), reason) || !strings.Contains(err.Error(), fmt.Sprintf("%q", name)) {
		t.Fatalf("error %q, want it to name %q and say %q", err, name, reason)
	}
}

func TestWhiteout(t *testing.T) {
	layer := mustApply(t, dir("a"), file("a/.wh.b", ""))
	st := lstat(t, filepath.Join(layer, "a", "b"))
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Fatalf("a/b mode %o rdev %d, want a 0/0 character device", st.Mode, st.Rdev)
	}
	if _, err := os.Lstat(filepath.Join(layer, "a", ".wh.b")); !os.IsNotExist(err) {
		t.Fatalf("whiteout marker itself written: %v", err)
	}
}

func TestWhiteoutReplacesEntry(t *testing.T) {
	layer := mustApply(t, file("a/b/c", "x"), file("a/.wh.b", ""))
	st := lstat(t, filepath.Join(layer, "a", "b"))
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Fatalf("a/b mode %o, want a 0/0 character device", st.Mode)
	}
}

func TestOpaque(t *testing.T) {
	layer := mustApply(t, dir("a"), file("a/.wh..wh..opq", ""), file("a/f", "x"))
	buf := make([]byte, 16)
	n, err := unix.Lgetxattr(filepath.Join(layer, "a"), "trusted.overlay.opaque", buf)
	if err != nil || string(buf[:n]) != "y" {
		t.Fatalf("trusted.overlay.opaque = %q, %v; want \"y\"", buf[:n], err)
	}
	if _, err := os.Lstat(filepath.Join(layer, "a", ".wh..wh..opq")); !os.IsNotExist(err) {
		t.Fatalf("opaque marker itself written: %v", err)
	}
}

func TestHardLinkSharesInode(t *testing.T) {
	layer := mustApply(t, file("a/f", "content"), hardlink("b/g", "./a/f"))
	f, g := lstat(t, filepath.Join(layer, "a/f")), lstat(t, filepath.Join(layer, "b/g"))
	if f.Ino != g.Ino || f.Nlink != 2 {
		t.Fatalf("inodes %d and %d, nlink %d; want one inode with two links", f.Ino, g.Ino, f.Nlink)
	}
}

func TestSetuidAndOwner(t *testing.T) {
	e := file("bin/su", "#!")
	e.hdr.Mode = 0o4755
	e.hdr.Uid, e.hdr.Gid = 1234, 5678
	d := dir("tmp")
	d.hdr.Mode = 0o1777
	d.hdr.Uid = 1234
	layer := mustApply(t, e, d)
	st := lstat(t, filepath.Join(layer, "bin/su"))
	if st.Mode&0o7777 != 0o4755 {
		t.Fatalf("mode %o, want 4755", st.Mode&0o7777)
	}
	if st.Uid != 1234 || st.Gid != 5678 {
		t.Fatalf("owner %d:%d, want 1234:5678", st.Uid, st.Gid)
	}
	if st := lstat(t, filepath.Join(layer, "tmp")); st.Mode&0o7777 != 0o1777 || st.Uid != 1234 {
		t.Fatalf("tmp mode %o owner %d, want 1777 owned by 1234", st.Mode&0o7777, st.Uid)
	}
}

func TestDeviceNode(t *testing.T) {
	c := entry{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3}}
	b := entry{hdr: tar.Header{Typeflag: tar.TypeBlock, Name: "dev/sda", Mode: 0o660, Devmajor: 8, Devminor: 1}}
	p := entry{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "dev/fifo", Mode: 0o600}}
	layer := mustApply(t, c, b, p)
	st := lstat(t, filepath.Join(layer, "dev/null"))
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 1 || unix.Minor(st.Rdev) != 3 || st.Mode&0o7777 != 0o666 {
		t.Fatalf("dev/null mode %o rdev %d:%d", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	st = lstat(t, filepath.Join(layer, "dev/sda"))
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(st.Rdev) != 8 || unix.Minor(st.Rdev) != 1 {
		t.Fatalf("dev/sda mode %o rdev %d:%d", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	if st := lstat(t, filepath.Join(layer, "dev/fifo")); st.Mode&unix.S_IFMT != unix.S_IFIFO {
		t.Fatalf("dev/fifo mode %o", st.Mode)
	}
}

func TestTarSlipRefused(t *testing.T) {
	parent, _ := sentinel(t)
	for _, tc := range []struct {
		name    string
		entries []entry
		bad     string
	}{
		{"absolute", []entry{symlink("evil", parent), file("evil/escaped", "x")}, "evil/escaped"},
		{"relative", []entry{symlink("evil", ".."), file("evil/escaped", "x")}, "evil/escaped"},
		{"nested", []entry{dir("d"), symlink("d/evil", "../.."), dir("d/evil/escaped")}, "d/evil/escaped"},
		{"hardlink", []entry{symlink("evil", ".."), hardlink("escaped", "evil/layer")}, "escaped"},
		{"whiteout", []entry{symlink("evil", ".."), file("evil/.wh.layer", "")}, "evil/.wh.layer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := apply(t, Limits{}, tc.entries...)
			wantUnsafe(t, err, tc.bad, "goes through a symlink")
		})
	}
	checkSentinel(t, parent)
}

func TestDotDotRefused(t *testing.T) {
	for _, name := range []string{"../x", "a/../../x", "/../x", "./../x"} {
		_, _, err := apply(t, Limits{}, file(name, "x"))
		wantUnsafe(t, err, name, "escapes the layer")
	}
}

func TestBadNamesRefused(t *testing.T) {
	_, _, err := apply(t, Limits{}, file(strings.Repeat("a/", 2048)+"b", "x"))
	if !errors.Is(err, ErrUnsafe) {
		t.Fatalf("long name: error %v, want ErrUnsafe", err)
	}
}

func TestAbsoluteSymlinkVerbatim(t *testing.T) {
	layer := mustApply(t, symlink("etc/passwd", "/etc/shadow"), symlink("rel", "../../x"))
	for name, want := range map[string]string{"etc/passwd": "/etc/shadow", "rel": "../../x"} {
		got, err := os.Readlink(filepath.Join(layer, name))
		if err != nil || got != want {
			t.Fatalf("%s -> %q, %v; want %q", name, got, err, want)
		}
	}
}

func TestHardLinkOutsideRefused(t *testing.T) {
	for _, target := range []string{"../x", "/../x", "a/../../x"} {
		_, _, err := apply(t, Limits{}, hardlink("l", target))
		wantUnsafe(t, err, "l", "escapes the layer")
	}
	_, _, err := apply(t, Limits{}, dir("d"), hardlink("l", "d"))
	wantUnsafe(t, err, "l", "hard link to directory")
}

func TestTrustedXattrRefused(t *testing.T) {
	e := dir("a")
	e.hdr.PAXRecords = map[string]string{"SCHILY.xattr.trusted.overlay.opaque": "y"}
	layer, _, err := apply(t, Limits{}, e)
	wantUnsafe(t, err, "a", "sets the trusted xattr trusted.overlay.opaque")
	if _, err := unix.Lgetxattr(filepath.Join(layer, "a"), "trusted.overlay.opaque", make([]byte, 8)); err == nil {
		t.Fatal("trusted.overlay.opaque written")
	}
}

func TestUserXattr(t *testing.T) {
	f := file("f", "x")
	f.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.x": "v1", "SCHILY.xattr.other.y": "ignored"}
	d := dir("d")
	d.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.x": "v2"}
	layer := mustApply(t, f, d)
	for name, want := range map[string]string{"f": "v1", "d": "v2"} {
		buf := make([]byte, 16)
		n, err := unix.Lgetxattr(filepath.Join(layer, name), "user.x", buf)
		if err != nil || string(buf[:n]) != want {
			t.Fatalf("%s user.x = %q, %v; want %q", name, buf[:n], err, want)
		}
	}
}

func TestMaxBytes(t *testing.T) {
	_, st, err := apply(t, Limits{MaxBytes: 10}, file("a", "12345"), file("b", "12345"))
	if err != nil || st.Bytes != 10 || st.Entries != 2 {
		t.Fatalf("at the limit: %+v, %v", st, err)
	}
	_, _, err = apply(t, Limits{MaxBytes: 10}, file("a", "12345"), file("b", "123456"))
	var ee *EntryError
	if !errors.Is(err, ErrTooLarge) || !errors.As(err, &ee) || ee.Name != "b" {
		t.Fatalf("over the limit: %v, want ErrTooLarge for b", err)
	}
}

// TestMaxBytesCountsContent checks the limit across large files.
func TestMaxBytesCountsContent(t *testing.T) {
	big := strings.Repeat("x", 3<<20)
	_, _, err := apply(t, Limits{MaxBytes: 2 << 20}, file("a", big[:1<<20]), file("b", big))
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("error %v, want ErrTooLarge", err)
	}
}

func TestMaxEntries(t *testing.T) {
	if _, st, err := apply(t, Limits{MaxEntries: 3}, file("a", ""), file("b", ""), file("c", "")); err != nil || st.Entries != 3 {
		t.Fatalf("at the limit: %+v, %v", st, err)
	}
	_, _, err := apply(t, Limits{MaxEntries: 3}, file("a", ""), file("b", ""), file("c", ""), file("d", ""))
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("error %v, want ErrTooLarge", err)
	}
}

func TestDuplicatesLaterWins(t *testing.T) {
	layer := mustApply(t,
		file("f", "first"), file("f", "second"),
		file("d/x", "x"), file("d", "file now"),
		file("g", "g"), dir("g"), file("g/in", "in"),
		symlink("s", "/"), file("s", "real"),
		dir("k"), dir("k"), file("k/y", "y"),
	)
	for name, want := range map[string]string{"f": "second", "d": "file now", "g/in": "in", "s": "real", "k/y": "y"} {
		got, err := os.ReadFile(filepath.Join(layer, name))
		if err != nil || string(got) != want {
			t.Fatalf("%s = %q, %v; want %q", name, got, err, want)
		}
		if st := lstat(t, filepath.Join(layer, name)); st.Mode&unix.S_IFMT != unix.S_IFREG {
			t.Fatalf("%s mode %o, want a regular file", name, st.Mode)
		}
	}
}

func TestDirReplacedBySymlinkNotFollowed(t *testing.T) {
	parent, layer := sentinel(t)
	outside := filepath.Join(parent, "layer", "..")
	tr := buildTar(t, file("d/keep", "x"), symlink("d", outside), file("d/escaped", "x"))
	_, err := Apply(context.Background(), bytes.NewReader(tr), layer, Limits{})
	wantUnsafe(t, err, "d/escaped", "goes through a symlink")
	checkSentinel(t, parent)
}

func TestCancelledContext(t *testing.T) {
	parent, layer := sentinel(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Apply(ctx, bytes.NewReader(buildTar(t, file("a", "x"))), layer, Limits{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
	if ents, _ := os.ReadDir(layer); len(ents) != 0 {
		t.Fatalf("entries written after cancel: %v", ents)
	}
	checkSentinel(t, parent)
}

func TestUnsupportedType(t *testing.T) {
	_, _, err := apply(t, Limits{}, entry{hdr: tar.Header{Typeflag: tar.TypeCont, Name: "c"}})
	var ee *EntryError
	if !errors.As(err, &ee) || ee.Name != "c" || !strings.Contains(err.Error(), "unsupported entry type") {
		t.Fatalf("error %v, want unsupported entry type for c", err)
	}
}

func TestTimes(t *testing.T) {
	when := time.Unix(1500000000, 0)
	d := dir("d")
	d.hdr.ModTime = when
	f := file("d/f", "x")
	f.hdr.ModTime = when
	layer := mustApply(t, d, f, file("d/g", "late"))
	for _, name := range []string{"d", "d/f"} {
		st := lstat(t, filepath.Join(layer, name))
		if got := time.Unix(st.Mtim.Unix()); !got.Equal(when) {
			t.Fatalf("%s mtime %v, want %v", name, got, when)
		}
	}
}

func TestRegularFileContent(t *testing.T) {
	layer := mustApply(t, file("./a/b/c.txt", "hello"), file("/abs", "y"))
	for name, want := range map[string]string{"a/b/c.txt": "hello", "abs": "y"} {
		got, err := os.ReadFile(filepath.Join(layer, name))
		if err != nil || string(got) != want {
			t.Fatalf("%s = %q, %v", name, got, err)
		}
	}
}

// benchTar writes a ~50 MiB layer of 2000 files of varied sizes in nested
// directories.
func benchTar(b *testing.B) string {
	b.Helper()
	p := filepath.Join(b.TempDir(), "layer.tar")
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	tw := tar.NewWriter(f)
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	mtime := time.Unix(1700000000, 0)
	for d := range 40 {
		name := fmt.Sprintf("usr/lib/pkg%02d/sub%d/", d, d%5)
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: mtime}); err != nil {
			b.Fatal(err)
		}
		for i := range 50 {
			var size int
			switch {
			case i%25 == 0:
				size = 256<<10 + rng.IntN(512<<10)
			case i%5 == 0:
				size = 8<<10 + rng.IntN(32<<10)
			default:
				size = rng.IntN(8 << 10)
			}
			h := &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%sfile%03d", name, i),
				Mode: 0o644, Size: int64(size), ModTime: mtime}
			if err := tw.WriteHeader(h); err != nil {
				b.Fatal(err)
			}
			if _, err := tw.Write(buf[:size]); err != nil {
				b.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	return p
}

func BenchmarkApply(b *testing.B) {
	tarPath := benchTar(b)
	fi, err := os.Stat(tarPath)
	if err != nil {
		b.Fatal(err)
	}
	gnuTar, err := exec.LookPath("tar")
	if err != nil {
		b.Skip("no tar")
	}
	work := b.TempDir()
	var applyTime, tarTime time.Duration
	n := 0
	for b.Loop() {
		d := filepath.Join(work, fmt.Sprintf("apply%d", n))
		if err := os.Mkdir(d, 0o755); err != nil {
			b.Fatal(err)
		}
		f, err := os.Open(tarPath)
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		if _, err := Apply(context.Background(), f, d, Limits{}); err != nil {
			b.Fatal(err)
		}
		applyTime += time.Since(start)
		f.Close()

		d2 := filepath.Join(work, fmt.Sprintf("tar%d", n))
		if err := os.Mkdir(d2, 0o755); err != nil {
			b.Fatal(err)
		}
		start = time.Now()
		if out, err := exec.Command(gnuTar, "-x", "-f", tarPath, "-C", d2).CombinedOutput(); err != nil {
			b.Fatalf("tar -x: %v: %s", err, out)
		}
		tarTime += time.Since(start)

		b.StopTimer()
		os.RemoveAll(d)
		os.RemoveAll(d2)
		b.StartTimer()
		n++
	}
	applyMs := float64(applyTime.Microseconds()) / 1000 / float64(n)
	tarMs := float64(tarTime.Microseconds()) / 1000 / float64(n)
	b.ReportMetric(applyMs, "apply-ms/op")
	b.ReportMetric(tarMs, "tar-x-ms/op")
	b.ReportMetric(applyMs/tarMs, "apply/tar-x")
	b.ReportMetric(float64(fi.Size())/(1<<20), "layer-MiB")
}

func TestHardLinkReplacesEntry(t *testing.T) {
	layer := mustApply(t, dir("./"), file("t", "target"), file("l", "old"), hardlink("l", "t"),
		file(".wh..wh.plnk", ""), hardlink("t", "t"))
	tst, lst := lstat(t, filepath.Join(layer, "t")), lstat(t, filepath.Join(layer, "l"))
	if tst.Ino != lst.Ino {
		t.Fatal("l does not share t's inode")
	}
	if got, err := os.ReadFile(filepath.Join(layer, "l")); err != nil || string(got) != "target" {
		t.Fatalf("l = %q, %v", got, err)
	}
	ents, _ := os.ReadDir(layer)
	if len(ents) != 2 {
		t.Fatalf("layer holds %d entries, want t and l", len(ents))
	}
	_, _, err := apply(t, Limits{}, hardlink("l", "missing"))
	var ee *EntryError
	if !errors.As(err, &ee) || ee.Name != "l" {
		t.Fatalf("link to a missing target: %v", err)
	}
}
