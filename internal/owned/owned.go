// Package owned owns the directories the library creates and uses: the bundle root, runsc's
// state root, the warm-pool directory, each cell's bundle and checkpoint image directories.
// It is the only way to create, open and use them, so that another local user or a planted
// symlink cannot redirect what a supervisor running as root reads, writes or deletes.
//
// The rule is OpenSSH's StrictModes. A directory is accepted when it is a real directory (not a
// symlink), owned by the process's effective uid and not writable by group or others; and when
// every ancestor, from / down, is a real directory owned by root or that uid and not writable by
// group or others, unless it has the sticky bit (as /tmp has): there nobody else can rename or
// remove the entries they do not own. Paths are walked one component at a time through directory
// file descriptors opened with O_NOFOLLOW, and everything below a Dir goes through its descriptor.
package owned

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrRefused is wrapped by every error that refuses a path the library cannot trust: a symlink,
// a file or directory of another user, one others can write to, a directory replaced since it
// was opened, a mount point RemoveAll would descend into, a file too large for ReadFile.
var ErrRefused = errors.New("refused")

type refusal struct{ path, reason string }

func (e *refusal) Error() string        { return e.path + ": " + e.reason }
func (e *refusal) Is(target error) bool { return target == ErrRefused }

func refuse(path, format string, args ...any) error {
	return &refusal{path, fmt.Sprintf(format, args...)}
}

// Dir is an open directory that passed the checks. Its methods are safe for concurrent use,
// except Close.
type Dir struct {
	// mu is held (shared) by every operation on fd and exclusively by Close: a Dir closed while
	// another goroutine uses it makes that use fail, never act on a reused descriptor number.
	mu       sync.RWMutex
	fd       int // O_RDONLY|O_DIRECTORY
	path     string
	euid     int
	dev, ino uint64
}

const (
	opathFlags = unix.O_PATH | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	intermPerm = 0o711 // the mode of an intermediate directory Ensure creates
)

// Ensure opens the directory at the absolute path, creating what is missing: intermediate
// directories with mode 0711, the last one with perm, exactly, whatever the umask. An existing
// directory keeps its mode.
func Ensure(path string, perm os.FileMode) (*Dir, error) {
	if err := checkPerm(path, perm); err != nil {
		return nil, err
	}
	return walk(path, unix.Geteuid(), true, unixMode(perm))
}

// Open opens the existing directory at the absolute path. A missing one gives an error that
// matches fs.ErrNotExist.
func Open(path string) (*Dir, error) { return walk(path, unix.Geteuid(), false, 0) }

// Check reports whether the directory at path exists and passes the checks.
func Check(path string) error {
	d, err := Open(path)
	if err != nil {
		return err
	}
	return d.Close()
}

// OpenIdent opens path like Open and refuses a directory other than the one with device dev
// and inode ino (Ident): a process handed a path checks it reached the directory meant.
func OpenIdent(path string, dev, ino uint64) (*Dir, error) {
	d, err := Open(path)
	if err != nil {
		return nil, err
	}
	if d.dev != dev || d.ino != ino {
		_ = d.Close()
		return nil, refuse(d.path, "replaced (device %d inode %d, expected device %d inode %d)", d.dev, d.ino, dev, ino)
	}
	return d, nil
}

// walk opens path from / down, one component at a time, checking each and creating missing
// ones when create is set.
func walk(path string, euid int, create bool, perm uint32) (*Dir, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("%q is not an absolute path", path)
	}
	path = filepath.Clean(path)
	fd, err := openat(unix.AT_FDCWD, "/", opathFlags, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: "/", Err: err}
	}
	cur := "/"
	var names []string
	if path != "/" {
		names = strings.Split(path[1:], "/")
	}
	for i, name := range names {
		if _, err := checkDir(fd, cur, euid, true); err != nil {
			unix.Close(fd)
			return nil, err
		}
		next, mode := filepath.Join(cur, name), uint32(intermPerm)
		if i == len(names)-1 {
			mode = perm
		}
		child, err := openOrCreate(fd, next, name, create, mode)
		unix.Close(fd)
		if err != nil {
			return nil, err
		}
		fd, cur = child, next
	}
	return finish(fd, cur, euid)
}

// openOrCreate opens the directory name in parent as an O_PATH descriptor; with create, a missing
// one is made with mode exactly.
func openOrCreate(parent int, path, name string, create bool, mode uint32) (int, error) {
	fd, err := openDirPath(parent, path, name)
	if !create || !errors.Is(err, unix.ENOENT) {
		return fd, err
	}
	made := true
	if err := unix.Mkdirat(parent, name, mode); errors.Is(err, unix.EEXIST) {
		made = false // created meanwhile by someone else: checked like any existing one
	} else if err != nil {
		return -1, &fs.PathError{Op: "mkdir", Path: path, Err: err}
	}
	if fd, err = openDirPath(parent, path, name); err != nil || !made {
		return fd, err
	}
	if err := fchmodPath(fd, mode); err != nil {
		unix.Close(fd)
		return -1, &fs.PathError{Op: "chmod", Path: path, Err: err}
	}
	return fd, nil
}

// openDirPath opens the directory name in parent as an O_PATH descriptor, never following a
// symlink.
func openDirPath(parent int, path, name string) (int, error) {
	fd, err := openat(parent, name, opathFlags, 0)
	if err != nil {
		return -1, openError(parent, path, name, err)
	}
	return fd, nil
}

// openError names a symlink as such: O_NOFOLLOW reports one as ELOOP, or as ENOTDIR with
// O_PATH|O_DIRECTORY.
func openError(parent int, path, name string, err error) error {
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
		var st unix.Stat_t
		if unix.Fstatat(parent, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
			return refuse(path, "is a symlink")
		}
	}
	return &fs.PathError{Op: "open", Path: path, Err: err}
}

// fchmodPath sets the mode of the directory behind an O_PATH descriptor, which fchmod refuses.
func fchmodPath(fd int, mode uint32) error {
	r, err := openat(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(r)
	return unix.Fchmod(r, mode)
}

// finish checks the O_PATH descriptor fd as the directory the caller asked for and reopens it
// for reading. It closes fd.
func finish(fd int, path string, euid int) (*Dir, error) {
	defer unix.Close(fd)
	st, err := checkDir(fd, path, euid, false)
	if err != nil {
		return nil, err
	}
	r, err := openat(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return &Dir{fd: r, path: path, euid: euid, dev: st.Dev, ino: st.Ino}, nil
}

// checkDir applies the ownership rule to the directory fd: the rule for an ancestor, or for
// the directory the library uses.
func checkDir(fd int, path string, euid int, ancestor bool) (*unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, &fs.PathError{Op: "open", Path: path, Err: unix.ENOTDIR}
	}
	uid := int(st.Uid)
	switch {
	case ancestor && uid != 0 && uid != euid:
		return nil, refuse(path, "owned by uid %d, not by root or %d (the library's euid)", uid, euid)
	case !ancestor && uid != euid:
		return nil, refuse(path, "owned by uid %d, not by %d (the library's euid)", uid, euid)
	}
	if w := writableBy(st.Mode); w != "" && (!ancestor || st.Mode&unix.S_ISVTX == 0) {
		return nil, refuse(path, "is %s-writable (mode %04o)", w, st.Mode&0o7777)
	}
	return &st, nil
}

// writableBy says who besides the owner can write to a file of this mode: "group", "world",
// "group- and world", or "".
func writableBy(mode uint32) string {
	switch mode & 0o022 {
	case 0o020:
		return "group"
	case 0o002:
		return "world"
	case 0o022:
		return "group- and world"
	}
	return ""
}

// checkPerm refuses a mode that would fail the checks on the directory it creates.
func checkPerm(path string, perm os.FileMode) error {
	if perm&0o022 != 0 {
		return fmt.Errorf("%s: mode %04o would make it writable by others than its owner", path, unixMode(perm))
	}
	return nil
}

func unixMode(perm os.FileMode) uint32 {
	m := uint32(perm.Perm())
	if perm&os.ModeSetuid != 0 {
		m |= unix.S_ISUID
	}
	if perm&os.ModeSetgid != 0 {
		m |= unix.S_ISGID
	}
	if perm&os.ModeSticky != 0 {
		m |= unix.S_ISVTX
	}
	return m
}

// openat retries EINTR, which a network or FUSE file system may return.
func openat(dirfd int, name string, flags int, mode uint32) (int, error) {
	for {
		fd, err := unix.Openat(dirfd, name, flags, mode)
		if err != unix.EINTR {
			return fd, err
		}
	}
}

// Path returns the path the directory was opened at.
func (d *Dir) Path() string { return d.path }

// Fd returns the directory's descriptor (O_RDONLY|O_DIRECTORY), valid until Close.
func (d *Dir) Fd() int { return d.fd }

// Ident returns the device and inode of the directory, for OpenIdent.
func (d *Dir) Ident() (dev, ino uint64) { return d.dev, d.ino }

// Close closes the directory's descriptor.
func (d *Dir) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fd < 0 {
		return &fs.PathError{Op: "close", Path: d.path, Err: fs.ErrClosed}
	}
	fd := d.fd
	d.fd = -1
	if err := unix.Close(fd); err != nil {
		return &fs.PathError{Op: "close", Path: d.path, Err: err}
	}
	return nil
}

// Verify checks that Path still leads, through directories that pass the checks, to the
// directory open in d, and that d still passes them: a directory exchanged for another
// (renameat2 RENAME_EXCHANGE) since it was opened is refused as replaced.
func (d *Dir) Verify() error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if _, err := checkDir(d.fd, d.path, d.euid, false); err != nil {
		return err
	}
	now, err := walk(d.path, d.euid, false, 0)
	if err != nil {
		return fmt.Errorf("%s: replaced or removed: %w", d.path, err)
	}
	defer now.Close()
	if now.dev != d.dev || now.ino != d.ino {
		return refuse(d.path, "replaced (now device %d inode %d, opened as device %d inode %d)", now.dev, now.ino, d.dev, d.ino)
	}
	return nil
}
