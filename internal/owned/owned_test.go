package owned

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

const nobody = 65534

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test chowns to another user")
	}
}

// snapshot lists the tree under root, without following symlinks: path, mode, owner, target.
func snapshot(t *testing.T, root string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		require.NoError(t, unix.Lstat(p, &st))
		fmt.Fprintf(&b, "%s %o %d", p, st.Mode, st.Uid)
		if e.Type()&fs.ModeSymlink != 0 {
			target, err := os.Readlink(p)
			require.NoError(t, err)
			fmt.Fprintf(&b, " -> %s", target)
		}
		b.WriteByte('\n')
		return nil
	})
	require.NoError(t, err)
	return b.String()
}

// mkdir makes a directory with the raw mode (0o1777 is sticky, as os.FileMode's is not).
func mkdir(t *testing.T, path string, mode uint32, uid int) {
	t.Helper()
	require.NoError(t, os.Mkdir(path, 0o700))
	require.NoError(t, unix.Chmod(path, mode))
	require.NoError(t, os.Chown(path, uid, uid))
}

func TestRefusals(t *testing.T) {
	needRoot(t)
	for _, tc := range []struct {
		name   string
		setup  func(base string) // base is root's, 0700
		target string            // relative to base
		bad    string            // the directory the error names, relative to base
		reason string
	}{
		{"other owner", func(b string) { mkdir(t, b+"/d", 0o700, nobody) },
			"d", "d", "owned by uid 65534, not by 0 (the library's euid)"},
		{"other owner of an ancestor", func(b string) { mkdir(t, b+"/d", 0o755, nobody) },
			"d/e/f", "d", "owned by uid 65534, not by root or 0 (the library's euid)"},
		{"group-writable", func(b string) { mkdir(t, b+"/d", 0o775, 0) },
			"d", "d", "is group-writable (mode 0775)"},
		{"world-writable", func(b string) { mkdir(t, b+"/d", 0o777, 0) },
			"d", "d", "is group- and world-writable (mode 0777)"},
		{"sticky is no excuse for the directory itself", func(b string) { mkdir(t, b+"/d", 0o1777, 0) },
			"d", "d", "is group- and world-writable (mode 1777)"},
		{"symlink as the last component", func(b string) {
			mkdir(t, b+"/real", 0o700, 0)
			require.NoError(t, os.Symlink("real", b+"/link"))
		}, "link", "link", "is a symlink"},
		{"symlink as an intermediate component", func(b string) {
			mkdir(t, b+"/real", 0o700, 0)
			require.NoError(t, os.Symlink(b+"/real", b+"/link"))
		}, "link/sub", "link", "is a symlink"},
		{"world-writable ancestor without the sticky bit", func(b string) {
			mkdir(t, b+"/ww", 0o777, 0)
			mkdir(t, b+"/ww/d", 0o700, 0)
		}, "ww/d", "ww", "is group- and world-writable (mode 0777)"},
		{"group-writable ancestor", func(b string) { mkdir(t, b+"/gw", 0o770, 0) },
			"gw/d", "gw", "is group-writable (mode 0770)"},
		{"sticky ancestor owned by another user", func(b string) {
			mkdir(t, b+"/st", 0o1777, nobody)
			mkdir(t, b+"/st/d", 0o700, 0)
		}, "st/d", "st", "owned by uid 65534, not by root or 0 (the library's euid)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := t.TempDir()
			tc.setup(base)
			before := snapshot(t, base)
			want := filepath.Join(base, tc.bad) + ": " + tc.reason

			_, err := Ensure(filepath.Join(base, tc.target), 0o700)
			require.ErrorIs(t, err, ErrRefused)
			assert.EqualError(t, err, want)
			_, err = Open(filepath.Join(base, tc.target))
			assert.EqualError(t, err, want)
			assert.ErrorIs(t, Check(filepath.Join(base, tc.target)), ErrRefused)

			assert.Equal(t, before, snapshot(t, base), "nothing created or changed")
		})
	}
}

func TestStickyRootAncestorAccepted(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	mkdir(t, base+"/st", 0o1777, 0)
	d, err := Ensure(base+"/st/mine", 0o700)
	require.NoError(t, err)
	defer d.Close()
	assert.Equal(t, base+"/st/mine", d.Path())
	require.NoError(t, d.Verify())
}

func TestEnsureAndOpen(t *testing.T) {
	base := t.TempDir()
	_, err := Open(base + "/missing")
	assert.ErrorIs(t, err, fs.ErrNotExist)
	_, err = Open(base + "/missing/deeper")
	assert.ErrorIs(t, err, fs.ErrNotExist)
	_, err = Ensure("relative/path", 0o700)
	assert.ErrorContains(t, err, "not an absolute path")
	_, err = Ensure(base+"/wide", 0o770)
	assert.ErrorContains(t, err, "writable by others")

	require.NoError(t, os.WriteFile(base+"/file", nil, 0o600))
	_, err = Ensure(base+"/file/sub", 0o700)
	assert.ErrorIs(t, err, unix.ENOTDIR)
	assert.NotErrorIs(t, err, ErrRefused)

	d, err := Ensure(base+"/a/../a/./b/", 0o700)
	require.NoError(t, err)
	assert.Equal(t, base+"/a/b", d.Path(), "cleaned")
	dev, ino := d.Ident()
	again, err := OpenIdent(base+"/a/b", dev, ino)
	require.NoError(t, err)
	require.NoError(t, again.Close())
	_, err = OpenIdent(base+"/a", dev, ino)
	assert.ErrorIs(t, err, ErrRefused)
	assert.ErrorContains(t, err, base+"/a: replaced")
	require.NoError(t, d.Close())
	assert.ErrorIs(t, d.Close(), fs.ErrClosed)
}

// TestEnsureExactModes creates trees in a child process with a restrictive and a permissive
// umask: the modes are the ones asked for, whatever the umask.
func TestEnsureExactModes(t *testing.T) {
	for _, umask := range []string{"0077", "0022", "0777"} {
		t.Run(umask, func(t *testing.T) {
			if umask == "0777" {
				needRoot(t) // a directory without owner read is reopened only by root
			}
			base := t.TempDir()
			out := helper(t, nil, "", "umask:"+umask, "tree:"+base+"/a/b/c")
			require.Equal(t, []string{"ok"}, out[1:])
			for path, want := range map[string]uint32{
				"a": 0o711, "a/b": 0o711, "a/b/c": 0o750,
				"a/b/c/m": 0o755, "a/b/c/f": 0o640, "a/b/c/g": 0o604, "a/b/c/h": 0o644,
			} {
				var st unix.Stat_t
				require.NoError(t, unix.Lstat(filepath.Join(base, path), &st))
				assert.Equal(t, fmt.Sprintf("%04o", want), fmt.Sprintf("%04o", st.Mode&0o7777), path)
			}
		})
	}
}

func TestVerifyDetectsExchange(t *testing.T) {
	base := t.TempDir()
	d, err := Ensure(base+"/a", 0o700)
	require.NoError(t, err)
	defer d.Close()
	require.NoError(t, os.Mkdir(base+"/b", 0o700))
	require.NoError(t, d.Verify())

	require.NoError(t, unix.Renameat2(unix.AT_FDCWD, base+"/a", unix.AT_FDCWD, base+"/b", unix.RENAME_EXCHANGE))
	err = d.Verify()
	require.ErrorIs(t, err, ErrRefused)
	assert.ErrorContains(t, err, base+"/a: replaced")
	dev, ino := d.Ident()
	_, err = OpenIdent(base+"/a", dev, ino)
	assert.ErrorContains(t, err, "replaced")

	require.NoError(t, os.RemoveAll(base+"/a"))
	assert.ErrorContains(t, d.Verify(), "replaced or removed")
}

func TestVerifyChecksOwnership(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	d, err := Ensure(base+"/a", 0o700)
	require.NoError(t, err)
	defer d.Close()
	require.NoError(t, os.Chown(base+"/a", nobody, nobody))
	assert.EqualError(t, d.Verify(), base+"/a: owned by uid 65534, not by 0 (the library's euid)")
}

func TestEntries(t *testing.T) {
	d, err := Ensure(t.TempDir(), 0o700)
	require.NoError(t, err)
	defer d.Close()

	sub, err := d.Mkdir("sub", 0o700)
	require.NoError(t, err)
	defer sub.Close()
	_, err = d.Mkdir("sub", 0o700)
	assert.ErrorIs(t, err, fs.ErrExist)
	for _, name := range []string{"", ".", "..", "a/b", "/abs", "nul\x00"} {
		_, err := d.OpenDir(name)
		assert.ErrorContains(t, err, "is not the name of an entry", "%q", name)
		assert.Error(t, d.WriteFile(name, nil, 0o600), "%q", name)
		assert.Error(t, d.RemoveAll(name), "%q", name)
	}

	require.NoError(t, d.WriteFile("f", []byte("one"), 0o600))
	assert.ErrorIs(t, d.WriteFile("f", []byte("two"), 0o600), fs.ErrExist)
	require.NoError(t, d.WriteFile("f.tmp", []byte("stale"), 0o600))
	require.NoError(t, d.WriteAtomic("f", []byte("three"), 0o600))
	data, err := d.ReadFile("f", 100)
	require.NoError(t, err)
	assert.Equal(t, "three", string(data))

	require.NoError(t, d.Symlink("f", "link"))
	st, err := d.Lstat("link")
	require.NoError(t, err)
	assert.Equal(t, uint32(unix.S_IFLNK), st.Mode&unix.S_IFMT)
	_, err = d.ReadFile("link", 100)
	assert.EqualError(t, err, d.Path()+"/link: is a symlink")
	_, err = d.OpenDir("link")
	assert.EqualError(t, err, d.Path()+"/link: is a symlink")
	_, err = d.OpenFile("link", os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	assert.EqualError(t, err, d.Path()+"/link: is a symlink")

	names, err := d.Entries()
	require.NoError(t, err)
	assert.Equal(t, []string{"f", "link", "sub"}, names, "sorted, no stale f.tmp")

	require.NoError(t, d.Rename("f", sub, "g"))
	require.NoError(t, sub.WriteFile("h", nil, 0o600))
	assert.ErrorIs(t, sub.Rename("g", sub, "h"), fs.ErrExist, "RENAME_NOREPLACE")
	opened, err := d.OpenDir("sub")
	require.NoError(t, err)
	defer opened.Close()
	names, err = opened.Entries()
	require.NoError(t, err)
	assert.Equal(t, []string{"g", "h"}, names)

	assert.ErrorIs(t, d.Remove("sub"), unix.ENOTEMPTY)
	require.NoError(t, d.Remove("link"))
	require.NoError(t, sub.Remove("g"))
	require.NoError(t, sub.Remove("h"))
	require.NoError(t, d.Remove("sub"))
	assert.ErrorIs(t, d.Remove("sub"), fs.ErrNotExist)

	tmp, err := d.MkdirTemp("exec-", 0o700)
	require.NoError(t, err)
	defer tmp.Close()
	assert.True(t, strings.HasPrefix(filepath.Base(tmp.Path()), "exec-"))
}

func TestOpenFile(t *testing.T) {
	d, err := Ensure(t.TempDir(), 0o700)
	require.NoError(t, err)
	defer d.Close()

	f, err := d.OpenFile("log", os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	require.NoError(t, err)
	_, err = f.WriteString("a")
	require.NoError(t, err)
	require.NoError(t, f.Close())
	f, err = d.OpenFile("log", os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	require.NoError(t, err)
	_, err = f.WriteString("b")
	require.NoError(t, err)
	require.NoError(t, f.Close())
	data, err := d.ReadFile("log", 10)
	require.NoError(t, err)
	assert.Equal(t, "ab", string(data), "appended")
	f, err = d.OpenFile("log", os.O_WRONLY|os.O_TRUNC, 0)
	require.NoError(t, err)
	_, err = f.WriteString("c")
	require.NoError(t, err)
	require.NoError(t, f.Close())
	data, err = d.ReadFile("log", 10)
	require.NoError(t, err)
	assert.Equal(t, "c", string(data), "truncated")

	require.NoError(t, unix.Mkfifo(d.Path()+"/fifo", 0o600))
	_, err = d.OpenFile("fifo", os.O_WRONLY|os.O_CREATE, 0o600)
	assert.Error(t, err, "a FIFO without a reader is not waited for")

	if os.Geteuid() == 0 {
		require.NoError(t, d.WriteFile("theirs", []byte("keep"), 0o666))
		require.NoError(t, os.Chown(d.Path()+"/theirs", nobody, nobody))
		_, err = d.OpenFile("theirs", os.O_WRONLY|os.O_TRUNC, 0)
		assert.EqualError(t, err, d.Path()+"/theirs: owned by uid 65534, not by 0 (the library's euid)")
		data, err := os.ReadFile(d.Path() + "/theirs")
		require.NoError(t, err)
		assert.Equal(t, "keep", string(data), "refused before truncating")
	}
}

func TestReadFileRefusals(t *testing.T) {
	d, err := Ensure(t.TempDir(), 0o700)
	require.NoError(t, err)
	defer d.Close()

	require.NoError(t, unix.Mkfifo(d.Path()+"/fifo", 0o600))
	done := make(chan error, 1)
	go func() { _, err := d.ReadFile("fifo", 100); done <- err }()
	select {
	case err := <-done:
		assert.EqualError(t, err, d.Path()+"/fifo: is a FIFO, not a regular file")
	case <-time.After(5 * time.Second):
		// Unblock the reader so the test ends.
		w, _ := os.OpenFile(d.Path()+"/fifo", os.O_WRONLY, 0)
		w.Close()
		t.Fatal("ReadFile blocked on a FIFO")
	}

	require.NoError(t, d.WriteFile("big", bytes.Repeat([]byte("x"), 100), 0o600))
	_, err = d.ReadFile("big", 99)
	assert.EqualError(t, err, d.Path()+"/big: holds 100 bytes, more than the 99 read")
	data, err := d.ReadFile("big", 100)
	require.NoError(t, err)
	assert.Len(t, data, 100)

	_, err = d.ReadFile(".", 100)
	assert.Error(t, err)
	sub, err := d.Mkdir("dir", 0o700)
	require.NoError(t, err)
	require.NoError(t, sub.Close())
	_, err = d.ReadFile("dir", 100)
	assert.EqualError(t, err, d.Path()+"/dir: is a directory, not a regular file")

	if os.Geteuid() == 0 {
		require.NoError(t, d.WriteFile("theirs", []byte("x"), 0o644))
		require.NoError(t, os.Chown(d.Path()+"/theirs", nobody, nobody))
		_, err = d.ReadFile("theirs", 100)
		assert.EqualError(t, err, d.Path()+"/theirs: owned by uid 65534, not by 0 (the library's euid)")
		assert.ErrorIs(t, err, ErrRefused)
	}
}

func TestRemoveAllStaysInside(t *testing.T) {
	base := t.TempDir()
	outside := filepath.Join(base, "outside")
	require.NoError(t, os.MkdirAll(outside+"/deep", 0o700))
	require.NoError(t, os.WriteFile(outside+"/deep/keep", []byte("x"), 0o600))
	require.NoError(t, os.WriteFile(outside+"/keep", []byte("x"), 0o600))

	d, err := Ensure(base+"/root", 0o700)
	require.NoError(t, err)
	defer d.Close()
	require.NoError(t, os.MkdirAll(d.Path()+"/tree/x/y", 0o700))
	require.NoError(t, os.WriteFile(d.Path()+"/tree/x/y/file", nil, 0o600))
	require.NoError(t, os.Symlink(outside, d.Path()+"/tree/dirlink"))
	require.NoError(t, os.Symlink(outside+"/keep", d.Path()+"/tree/x/filelink"))

	before := snapshot(t, outside)
	require.NoError(t, d.RemoveAll("tree"))
	assert.NoFileExists(t, d.Path()+"/tree")
	assert.Equal(t, before, snapshot(t, outside), "the symlinks' targets survive")
	require.NoError(t, d.RemoveAll("tree"), "a missing entry is not an error")

	require.NoError(t, d.WriteFile("file", nil, 0o600))
	require.NoError(t, d.RemoveAll("file"))
	assert.NoFileExists(t, d.Path()+"/file")
}

func TestRemoveAllStopsAtMountPoint(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	d, err := Ensure(base+"/root", 0o700)
	require.NoError(t, err)
	defer d.Close()
	outside := base + "/outside"
	require.NoError(t, os.Mkdir(outside, 0o700))
	require.NoError(t, os.WriteFile(outside+"/keep", nil, 0o600))

	for _, tc := range []struct {
		name  string
		mount func(dst string) error
	}{
		{"tmpfs", func(dst string) error { return unix.Mount("tmpfs", dst, "tmpfs", 0, "size=1m") }},
		{"bind mount of the same file system", func(dst string) error {
			return unix.Mount(outside, dst, "", unix.MS_BIND, "")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt := d.Path() + "/tree/sub/mnt"
			require.NoError(t, os.MkdirAll(mnt, 0o700))
			require.NoError(t, os.WriteFile(d.Path()+"/tree/sibling", nil, 0o600))
			require.NoError(t, tc.mount(mnt))
			t.Cleanup(func() { _ = unix.Unmount(mnt, unix.MNT_DETACH) })
			require.NoError(t, os.WriteFile(mnt+"/inside", nil, 0o600))

			err := d.RemoveAll("tree")
			require.ErrorIs(t, err, ErrRefused)
			assert.EqualError(t, err, mnt+": is a mount point; unmount it first")
			assert.FileExists(t, mnt+"/inside", "nothing removed in the mount")
			assert.NoFileExists(t, d.Path()+"/tree/sibling", "the rest is removed")

			require.NoError(t, unix.Unmount(mnt, 0))
			require.NoError(t, d.RemoveAll("tree"))
			assert.NoDirExists(t, d.Path()+"/tree")
		})
	}
	assert.FileExists(t, outside+"/keep")
	assert.FileExists(t, outside+"/inside", "written through the bind mount, kept")
}

// TestUnprivileged runs Ensure as nobody: a root-owned directory is refused, nobody's own
// directory in a sticky one is accepted.
func TestUnprivileged(t *testing.T) {
	needRoot(t)
	// The test binary and the tree must be reachable by nobody; t.TempDir's parent is 0700.
	top, err := os.MkdirTemp("", "owned-nobody-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(top) })
	require.NoError(t, os.Chmod(top, 0o755))
	bin := top + "/owned.test"
	copyFile(t, os.Args[0], bin)
	mkdir(t, top+"/rootdir", 0o755, 0)
	mkdir(t, top+"/sticky", 0o1777, 0)
	mkdir(t, top+"/nsticky", 0o1777, nobody)

	cred := &syscall.Credential{Uid: nobody, Gid: nobody}
	out := helper(t, cred, bin,
		"ensure:"+top+"/rootdir",
		"ensure:"+top+"/rootdir/x",
		"ensure:"+top+"/sticky/mine/sub",
		"ensure:"+top+"/nsticky/x")
	require.Len(t, out, 5)
	assert.Equal(t, "euid 65534", out[0])
	assert.Equal(t, "refused: "+top+"/rootdir: owned by uid 0, not by 65534 (the library's euid)", out[1])
	assert.Equal(t, "error: mkdir "+top+"/rootdir/x: permission denied", out[2])
	assert.Equal(t, "ok", out[3], "nobody's directory in a root-owned sticky one")
	assert.Equal(t, "ok", out[4], "in a sticky directory nobody owns")
	for path, want := range map[string]uint32{"sticky/mine": 0o711, "sticky/mine/sub": 0o700} {
		var st unix.Stat_t
		require.NoError(t, unix.Lstat(filepath.Join(top, path), &st))
		assert.Equal(t, uint32(nobody), st.Uid, path)
		assert.Equal(t, fmt.Sprintf("%04o", want), fmt.Sprintf("%04o", st.Mode&0o7777), path)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	require.NoError(t, err)
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	require.NoError(t, err)
	_, err = io.Copy(out, in)
	require.NoError(t, err)
	require.NoError(t, out.Close())
}

const helperEnv = "OWNED_TEST_HELPER"

// helper runs TestHelperProcess in a child (the test binary bin, or this one) with the steps
// given, as cred's user when cred is set, and returns the lines it reported.
func helper(t *testing.T, cred *syscall.Credential, bin string, steps ...string) []string {
	t.Helper()
	if bin == "" {
		bin = os.Args[0]
	}
	cmd := exec.Command(bin, append([]string{"-test.run=^TestHelperProcess$", "--"}, steps...)...)
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	cmd.Dir = filepath.Dir(bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.Output()
	require.NoError(t, err, "helper: %s%s", stdout, stderr.String())
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(stdout))
	for sc.Scan() {
		if line, ok := strings.CutPrefix(sc.Text(), "helper: "); ok {
			lines = append(lines, line)
		}
	}
	return lines
}

// TestHelperProcess is the child of helper; it reports "euid N", then one line per step.
func TestHelperProcess(t *testing.T) {
	if os.Getenv(helperEnv) == "" {
		t.Skip("the child process of other tests")
	}
	args := os.Args
	for len(args) > 0 && args[0] != "--" {
		args = args[1:]
	}
	report := func(err error) {
		switch {
		case err == nil:
			fmt.Println("helper: ok")
		case errors.Is(err, ErrRefused):
			fmt.Printf("helper: refused: %v\n", err)
		default:
			fmt.Printf("helper: error: %v\n", err)
		}
	}
	fmt.Println("helper: euid " + strconv.Itoa(os.Geteuid()))
	for _, step := range args[1:] {
		op, arg, _ := strings.Cut(step, ":")
		switch op {
		case "umask":
			m, err := strconv.ParseUint(arg, 8, 32)
			require.NoError(t, err)
			unix.Umask(int(m))
		case "ensure":
			d, err := Ensure(arg, 0o700)
			if err == nil {
				err = d.Close()
			}
			report(err)
		case "tree": // a directory and one entry of each kind, with modes the umask would narrow
			report(tree(arg))
		}
	}
}

func tree(path string) error {
	d, err := Ensure(path, 0o750)
	if err != nil {
		return err
	}
	defer d.Close()
	m, err := d.Mkdir("m", 0o755)
	if err != nil {
		return err
	}
	if err := m.Close(); err != nil {
		return err
	}
	if err := d.WriteFile("f", nil, 0o640); err != nil {
		return err
	}
	f, err := d.OpenFile("g", os.O_WRONLY|os.O_CREATE, 0o604)
	if err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return d.WriteAtomic("h", nil, 0o644)
}

func BenchmarkEnsureExisting(b *testing.B) {
	path := filepath.Join(b.TempDir(), "a", "b", "c", "d")
	require.NoError(b, os.MkdirAll(path, 0o700))
	for b.Loop() {
		d, err := Ensure(path, 0o700)
		if err != nil {
			b.Fatal(err)
		}
		d.Close()
	}
}
