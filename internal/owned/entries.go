package owned

// The entries of an open Dir: every operation goes through the directory's descriptor and takes
// one path component, so nothing below the Dir is reached through a symlink.

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// child returns the path of the entry name, refusing a name that is not one path component.
func (d *Dir) child(name string) (string, error) {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return "", fmt.Errorf("%s: %q is not the name of an entry", d.path, name)
	}
	return filepath.Join(d.path, name), nil
}

// Mkdir creates the directory name with mode perm exactly and opens it. An existing entry gives
// an error that matches fs.ErrExist.
func (d *Dir) Mkdir(name string, perm os.FileMode) (*Dir, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	path, err := d.child(name)
	if err != nil {
		return nil, err
	}
	if err := checkPerm(path, perm); err != nil {
		return nil, err
	}
	mode := unixMode(perm)
	if err := unix.Mkdirat(d.fd, name, mode); err != nil {
		return nil, &fs.PathError{Op: "mkdir", Path: path, Err: err}
	}
	fd, err := openDirPath(d.fd, path, name)
	if err != nil {
		return nil, err
	}
	if err := fchmodPath(fd, mode); err != nil {
		unix.Close(fd)
		return nil, &fs.PathError{Op: "chmod", Path: path, Err: err}
	}
	return finish(fd, path, d.euid)
}

// MkdirTemp creates a new directory named prefix followed by a random suffix, as Mkdir does.
func (d *Dir) MkdirTemp(prefix string, perm os.FileMode) (*Dir, error) {
	for range 100 {
		sub, err := d.Mkdir(prefix+strconv.FormatUint(rand.Uint64(), 36), perm)
		if !errors.Is(err, fs.ErrExist) {
			return sub, err
		}
	}
	return nil, fmt.Errorf("%s: no free name for a directory %s*", d.path, prefix)
}

// OpenDir opens the existing directory name, which must pass the checks.
func (d *Dir) OpenDir(name string) (*Dir, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	path, err := d.child(name)
	if err != nil {
		return nil, err
	}
	fd, err := openDirPath(d.fd, path, name)
	if err != nil {
		return nil, err
	}
	return finish(fd, path, d.euid)
}

// WriteFile creates the file name, which must not exist, with mode perm exactly, and writes data.
func (d *Dir) WriteFile(name string, data []byte, perm os.FileMode) error {
	f, err := d.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = d.Remove(name)
	}
	return err
}

// WriteAtomic replaces the file name with one holding data: written as name.tmp (a stale one
// removed first), then renamed over name, so a reader sees the old content or the new.
func (d *Dir) WriteAtomic(name string, data []byte, perm os.FileMode) error {
	if _, err := d.child(name); err != nil {
		return err
	}
	tmp := name + ".tmp"
	if err := d.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := d.WriteFile(tmp, data, perm); err != nil {
		return err
	}
	d.mu.RLock()
	err := unix.Renameat(d.fd, tmp, d.fd, name)
	d.mu.RUnlock()
	if err != nil {
		_ = d.Remove(tmp)
		return &fs.PathError{Op: "rename", Path: filepath.Join(d.path, name), Err: err}
	}
	return nil
}

// OpenFile opens the file name as os.OpenFile does, never following a symlink. An existing
// file must be a regular file owned by the library's euid; it is checked before O_TRUNC empties
// it. A file it creates gets mode perm exactly.
func (d *Dir) OpenFile(name string, flag int, perm os.FileMode) (*os.File, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	path, err := d.child(name)
	if err != nil {
		return nil, err
	}
	// O_NONBLOCK so that a FIFO planted as name cannot block the open; cleared once checked.
	base := flag&^(unix.O_TRUNC|unix.O_CREAT|unix.O_EXCL) | unix.O_NOFOLLOW | unix.O_CLOEXEC | unix.O_NONBLOCK
	mode, created := unixMode(perm), false
	var fd int
	if flag&unix.O_CREAT != 0 {
		fd, err = openat(d.fd, name, base|unix.O_CREAT|unix.O_EXCL, mode)
		created = err == nil
	}
	if flag&unix.O_CREAT == 0 || (flag&unix.O_EXCL == 0 && errors.Is(err, unix.EEXIST)) {
		fd, err = openat(d.fd, name, base, 0)
	}
	if err != nil {
		return nil, openError(d.fd, path, name, err)
	}
	if err := d.prepare(fd, path, flag, created, mode); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), path), nil
}

// prepare checks a file OpenFile opened and gives it what the caller's flags ask for.
func (d *Dir) prepare(fd int, path string, flag int, created bool, mode uint32) error {
	if created {
		if err := unix.Fchmod(fd, mode); err != nil {
			return &fs.PathError{Op: "chmod", Path: path, Err: err}
		}
	} else if err := d.checkFile(fd, path); err != nil {
		return err
	}
	if flag&unix.O_NONBLOCK == 0 {
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err == nil {
			_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_NONBLOCK)
		}
		if err != nil {
			return &fs.PathError{Op: "fcntl", Path: path, Err: err}
		}
	}
	if flag&unix.O_TRUNC != 0 && !created {
		if err := unix.Ftruncate(fd, 0); err != nil {
			return &fs.PathError{Op: "truncate", Path: path, Err: err}
		}
	}
	return nil
}

// checkFile refuses anything but a regular file owned by the library's euid.
func (d *Dir) checkFile(fd int, path string) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if t := st.Mode & unix.S_IFMT; t != unix.S_IFREG {
		return refuse(path, "is %s, not a regular file", typeName(t))
	}
	if int(st.Uid) != d.euid {
		return refuse(path, "owned by uid %d, not by %d (the library's euid)", st.Uid, d.euid)
	}
	return nil
}

func typeName(t uint32) string {
	switch t {
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFCHR, unix.S_IFBLK:
		return "a device"
	}
	return fmt.Sprintf("of type %#o", t)
}

// ReadFile reads the regular file name, owned by the library's euid and of at most max bytes.
// A FIFO planted as name is refused at once, not waited on.
func (d *Dir) ReadFile(name string, max int64) ([]byte, error) {
	f, err := d.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Size() > max {
		return nil, refuse(f.Name(), "holds %d bytes, more than the %d read", fi.Size(), max)
	}
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > max {
		return nil, refuse(f.Name(), "grew past the %d bytes read", max)
	}
	return data, nil
}

// Lstat returns the status of the entry name, not following a symlink.
func (d *Dir) Lstat(name string) (unix.Stat_t, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	var st unix.Stat_t
	path, err := d.child(name)
	if err != nil {
		return st, err
	}
	if err := unix.Fstatat(d.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return st, &fs.PathError{Op: "lstat", Path: path, Err: err}
	}
	return st, nil
}

// Entries returns the names in the directory, sorted.
func (d *Dir) Entries() ([]string, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	fd, err := openat(d.fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: d.path, Err: err}
	}
	f := os.NewFile(uintptr(fd), d.path)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	slices.Sort(names)
	return names, err
}

// Symlink creates the symlink name pointing at target.
func (d *Dir) Symlink(target, name string) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	path, err := d.child(name)
	if err != nil {
		return err
	}
	if err := unix.Symlinkat(target, d.fd, name); err != nil {
		return &fs.PathError{Op: "symlink", Path: path, Err: err}
	}
	return nil
}

// Rename moves the entry old to new in dir to, which it must not replace (fs.ErrExist).
func (d *Dir) Rename(old string, to *Dir, new string) error {
	path, err := d.child(old)
	if err != nil {
		return err
	}
	if _, err := to.child(new); err != nil {
		return err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	if to != d {
		to.mu.RLock()
		defer to.mu.RUnlock()
	}
	if err := unix.Renameat2(d.fd, old, to.fd, new, unix.RENAME_NOREPLACE); err != nil {
		return &os.LinkError{Op: "rename", Old: path, New: filepath.Join(to.path, new), Err: err}
	}
	return nil
}

// Remove removes the entry name: a file, a symlink (not what it points to), an empty directory.
func (d *Dir) Remove(name string) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	path, err := d.child(name)
	if err != nil {
		return err
	}
	err = unix.Unlinkat(d.fd, name, 0)
	if errors.Is(err, unix.EISDIR) {
		err = unix.Unlinkat(d.fd, name, unix.AT_REMOVEDIR)
	}
	if err != nil {
		return &fs.PathError{Op: "remove", Path: path, Err: err}
	}
	return nil
}

// RemoveAll removes the entry name and, for a directory, everything in it, never following a
// symlink. It refuses to descend into a mount point: the caller unmounts it first. It removes
// what it can and returns the first error; a missing name is not one.
func (d *Dir) RemoveAll(name string) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	path, err := d.child(name)
	if err != nil {
		return err
	}
	return removeAll(d.fd, d.dev, path, name)
}

func removeAll(parent int, parentDev uint64, path, name string) error {
	const mask = unix.STATX_TYPE | unix.STATX_INO
	var sx unix.Statx_t
	err := unix.Statx(parent, name, unix.AT_SYMLINK_NOFOLLOW|unix.AT_NO_AUTOMOUNT, mask, &sx)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if sx.Mode&unix.S_IFMT != unix.S_IFDIR {
		if err := unix.Unlinkat(parent, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return &fs.PathError{Op: "remove", Path: path, Err: err}
		}
		return nil
	}
	// The mount-root attribute (Linux 5.8) tells any mount, a bind mount of the same file system
	// too; st_dev, on older kernels, at least another file system.
	dev := unix.Mkdev(sx.Dev_major, sx.Dev_minor)
	if dev != parentDev || sx.Attributes&sx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 {
		return refuse(path, "is a mount point; unmount it first")
	}
	fd, err := openat(parent, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return openError(parent, path, name, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Dev != dev || st.Ino != sx.Ino {
		return refuse(path, "replaced while being removed")
	}
	names, err := f.Readdirnames(-1)
	if err != nil {
		return &fs.PathError{Op: "readdir", Path: path, Err: err}
	}
	var first error
	for _, n := range names {
		if err := removeAll(fd, dev, filepath.Join(path, n), n); err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return first
	}
	if err := unix.Unlinkat(parent, name, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
		return &fs.PathError{Op: "remove", Path: path, Err: err}
	}
	return nil
}
