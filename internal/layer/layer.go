// Package layer unpacks one OCI image layer — a tar stream from a source that may be hostile —
// into a directory, in overlayfs's on-disk format, so that layers stack as an overlay's lower
// directories. Nothing is ever reached through a symbolic link: every entry is created below a
// directory descriptor opened component by component with O_NOFOLLOW, and an entry whose path
// goes through a symlink is refused (the tar-slip: `evil -> /`, then `evil/etc/passwd`).
package layer

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Limits bound a layer; zero means no limit.
type Limits struct {
	MaxBytes   int64 // regular files' content
	MaxEntries int   // tar entries
}

// Stats say what a layer held.
type Stats struct {
	Entries int
	Bytes   int64
}

// Errors of Apply, matched with errors.Is.
var (
	ErrUnsafe   = errors.New("unsafe layer entry")
	ErrTooLarge = errors.New("layer too large")
)

// EntryError is a problem with one entry of the layer.
type EntryError struct {
	Name string
	Err  error
}

func (e *EntryError) Error() string { return fmt.Sprintf("layer entry %q: %v", e.Name, e.Err) }
func (e *EntryError) Unwrap() error { return e.Err }

func unsafe(name, format string, args ...any) error {
	return &EntryError{Name: name, Err: fmt.Errorf("%w: %s", ErrUnsafe, fmt.Sprintf(format, args...))}
}

const (
	maxName       = 4096
	whiteoutPre   = ".wh."
	opaqueMarker  = ".wh..wh..opq"
	opaqueXattr   = "trusted.overlay.opaque"
	xattrPAXPre   = "SCHILY.xattr."
	dirPerm       = 0o755
	openDirFlags  = unix.O_PATH | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	createFlags   = unix.O_WRONLY | unix.O_CREAT | unix.O_EXCL | unix.O_NOFOLLOW | unix.O_CLOEXEC
	atNoFollow    = unix.AT_SYMLINK_NOFOLLOW
	copyChunkSize = 256 << 10
)

// Apply unpacks the tar stream r into dir, an existing empty directory. On error dir may hold a
// partial tree, which the caller removes.
func Apply(ctx context.Context, r io.Reader, dir string, lim Limits) (Stats, error) {
	root, err := unix.Open(dir, openDirFlags, 0)
	if err != nil {
		return Stats{}, &fs.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(root)
	a := &applier{root: root, lim: lim, buf: make([]byte, copyChunkSize)}
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return a.st, err
		}
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return a.st, fmt.Errorf("reading the layer: %w", err)
		}
		a.st.Entries++
		if lim.MaxEntries > 0 && a.st.Entries > lim.MaxEntries {
			return a.st, &EntryError{Name: h.Name, Err: fmt.Errorf("%w: more than %d entries", ErrTooLarge, lim.MaxEntries)}
		}
		if err := a.entry(h, tr); err != nil {
			return a.st, err
		}
	}
	return a.st, a.dirTimes()
}

type dirTime struct {
	name string
	t    time.Time
}

type applier struct {
	root int
	lim  Limits
	st   Stats
	buf  []byte
	dirs []dirTime
}

// clean returns the entry's name inside the layer: leading "/" and "./" go, as tar tools do.
func clean(name string) (string, error) {
	if len(name) > maxName || strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("%w: a name longer than %d bytes or with a NUL byte", ErrUnsafe, maxName)
	}
	c := path.Clean("/" + name)
	if strings.Contains(name, "..") {
		// Clean("/"+name) resolves ".." at the root; a name that needs it escapes the layer.
		for _, part := range strings.Split(name, "/") {
			if part == ".." {
				return "", fmt.Errorf("%w: escapes the layer", ErrUnsafe)
			}
		}
	}
	return strings.TrimPrefix(c, "/"), nil
}

// parent opens the directory that holds name, creating missing directories, never following a
// symlink; it returns its descriptor and the entry's base name.
func (a *applier) parent(entry, name string) (int, string, error) {
	dir, base := path.Split(name)
	fd, err := unix.Dup(a.root)
	if err != nil {
		return -1, "", err
	}
	for _, c := range strings.Split(strings.TrimSuffix(dir, "/"), "/") {
		if c == "" {
			continue
		}
		next, err := unix.Openat(fd, c, openDirFlags, 0)
		if errors.Is(err, unix.ENOENT) {
			if err = unix.Mkdirat(fd, c, dirPerm); err == nil || errors.Is(err, unix.EEXIST) {
				next, err = unix.Openat(fd, c, openDirFlags, 0)
			}
		}
		if err != nil {
			var st unix.Stat_t
			if errors.Is(err, unix.ENOTDIR) && unix.Fstatat(fd, c, &st, atNoFollow) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
				err = unix.ELOOP
			}
			unix.Close(fd)
			if errors.Is(err, unix.ELOOP) {
				return -1, "", unsafe(entry, "its path goes through a symlink, %q", c)
			}
			if errors.Is(err, unix.ENOTDIR) {
				return -1, "", unsafe(entry, "its path goes through %q, which is not a directory", c)
			}
			return -1, "", &EntryError{Name: entry, Err: err}
		}
		unix.Close(fd)
		fd = next
	}
	return fd, base, nil
}

func (a *applier) entry(h *tar.Header, r io.Reader) error {
	name, err := clean(h.Name)
	if err != nil {
		return &EntryError{Name: h.Name, Err: err}
	}
	for k := range h.PAXRecords {
		if key, ok := strings.CutPrefix(k, xattrPAXPre); ok && strings.HasPrefix(key, "trusted.") {
			return unsafe(h.Name, "sets the trusted xattr %s, which only the host may set", key)
		}
	}
	if name == "" { // the layer's root
		if h.Typeflag == tar.TypeDir {
			return nil
		}
		return unsafe(h.Name, "a %s at the layer's root", typeName(h.Typeflag))
	}
	pfd, base, err := a.parent(h.Name, name)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	wrap := func(err error) error {
		if err == nil {
			return nil
		}
		var ee *EntryError
		if errors.As(err, &ee) {
			return err
		}
		return &EntryError{Name: h.Name, Err: err}
	}
	// Whiteouts, in overlayfs's format.
	if base == opaqueMarker {
		return wrap(setxattrAt(pfd, "", opaqueXattr, []byte("y")))
	}
	if strings.HasPrefix(base, whiteoutPre) {
		if strings.HasPrefix(base, whiteoutPre+whiteoutPre) {
			return nil // other AUFS metadata
		}
		target := strings.TrimPrefix(base, whiteoutPre)
		if target == "" || target == "." || target == ".." {
			return unsafe(h.Name, "a whiteout of nothing")
		}
		if err := removeEntry(pfd, target); err != nil {
			return wrap(err)
		}
		return wrap(unix.Mknodat(pfd, target, unix.S_IFCHR, 0))
	}
	if h.Typeflag == tar.TypeLink {
		if target, err := clean(h.Linkname); err == nil && target == name {
			return nil // a link to itself: the entry stays as it is
		}
	}
	if h.Typeflag != tar.TypeDir {
		if err := removeEntry(pfd, base); err != nil { // a later entry of the same name wins
			return wrap(err)
		}
	}
	mode := uint32(h.Mode & 0o7777)
	switch h.Typeflag {
	case tar.TypeDir:
		var st unix.Stat_t
		if err := unix.Fstatat(pfd, base, &st, atNoFollow); err == nil && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			if err := removeEntry(pfd, base); err != nil {
				return wrap(err)
			}
		}
		if err := unix.Mkdirat(pfd, base, dirPerm); err != nil && !errors.Is(err, unix.EEXIST) {
			return wrap(err)
		}
		a.dirs = append(a.dirs, dirTime{name, h.ModTime})
	case tar.TypeReg: // the reader reports the old TypeRegA as TypeReg
		if err := a.file(pfd, base, h, r); err != nil {
			return wrap(err)
		}
	case tar.TypeSymlink:
		if err := unix.Symlinkat(h.Linkname, pfd, base); err != nil {
			return wrap(err)
		}
	case tar.TypeLink:
		target, err := clean(h.Linkname)
		if err != nil || target == "" {
			return unsafe(h.Name, "a hard link to %q, which escapes the layer", h.Linkname)
		}
		tfd, tbase, err := a.parent(h.Name, target)
		if err != nil {
			return err
		}
		defer unix.Close(tfd)
		var st unix.Stat_t
		if err := unix.Fstatat(tfd, tbase, &st, atNoFollow); err != nil {
			return unsafe(h.Name, "a hard link to %q, which the layer does not hold: %v", h.Linkname, err)
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return unsafe(h.Name, "a hard link to directory %q", h.Linkname)
		}
		if err := unix.Linkat(tfd, tbase, pfd, base, 0); err != nil {
			return wrap(err)
		}
		return nil // the link shares the target's owner, mode and times
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		kind := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[h.Typeflag]
		if err := unix.Mknodat(pfd, base, kind|mode, int(unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor)))); err != nil {
			return wrap(err)
		}
	default:
		return unsafe(h.Name, "unsupported entry type %s", typeName(h.Typeflag))
	}
	return wrap(a.attributes(pfd, base, h, mode))
}

// file writes a regular file's content, bounded.
func (a *applier) file(pfd int, base string, h *tar.Header, r io.Reader) error {
	fd, err := unix.Openat(pfd, base, createFlags, 0o600)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	for {
		n, rerr := r.Read(a.buf)
		if n > 0 {
			a.st.Bytes += int64(n)
			if a.lim.MaxBytes > 0 && a.st.Bytes > a.lim.MaxBytes {
				return fmt.Errorf("%w: more than %d bytes of files", ErrTooLarge, a.lim.MaxBytes)
			}
			for p := a.buf[:n]; len(p) > 0; {
				w, err := unix.Write(fd, p)
				if err != nil {
					return err
				}
				p = p[w:]
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// attributes sets owner, then mode (a chown clears setuid bits), xattrs and times.
func (a *applier) attributes(pfd int, base string, h *tar.Header, mode uint32) error {
	if err := unix.Fchownat(pfd, base, h.Uid, h.Gid, atNoFollow); err != nil {
		return err
	}
	symlink := h.Typeflag == tar.TypeSymlink
	if !symlink {
		if err := unix.Fchmodat(pfd, base, mode, 0); err != nil {
			return err
		}
	}
	for k, v := range h.PAXRecords {
		key, ok := strings.CutPrefix(k, xattrPAXPre)
		if !ok || !(strings.HasPrefix(key, "user.") || key == "security.capability") {
			continue
		}
		if symlink && strings.HasPrefix(key, "user.") {
			continue // user xattrs are not allowed on symlinks
		}
		if err := setxattrAt(pfd, base, key, []byte(v)); err != nil {
			return err
		}
	}
	if h.Typeflag == tar.TypeDir {
		return nil // set at the end: later entries change them
	}
	ts := []unix.Timespec{unix.NsecToTimespec(h.AccessTime.UnixNano()), unix.NsecToTimespec(h.ModTime.UnixNano())}
	if h.AccessTime.IsZero() {
		ts[0] = ts[1]
	}
	return unix.UtimesNanoAt(pfd, base, ts, atNoFollow)
}

// dirTimes sets the directories' times, deepest last entries first.
func (a *applier) dirTimes() error {
	for i := len(a.dirs) - 1; i >= 0; i-- {
		d := a.dirs[i]
		pfd, base, err := a.parent(d.name, d.name)
		if err != nil {
			return err
		}
		ts := []unix.Timespec{unix.NsecToTimespec(d.t.UnixNano()), unix.NsecToTimespec(d.t.UnixNano())}
		err = unix.UtimesNanoAt(pfd, base, ts, atNoFollow)
		unix.Close(pfd)
		if err != nil && !errors.Is(err, unix.ENOENT) {
			return &EntryError{Name: d.name, Err: err}
		}
	}
	return nil
}

// setxattrAt sets an xattr of the entry base of the directory pfd (the directory itself when base
// is ""), without following a symlink.
func setxattrAt(pfd int, base, key string, val []byte) error {
	if base == "" {
		return unix.Setxattr(fmt.Sprintf("/proc/self/fd/%d", pfd), key, val, 0)
	}
	fd, err := unix.Openat(pfd, base, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		return unix.Lsetxattr(fmt.Sprintf("/proc/self/fd/%d", fd), key, val, 0)
	}
	return unix.Setxattr(fmt.Sprintf("/proc/self/fd/%d", fd), key, val, 0)
}

// removeEntry removes base of pfd when it exists: a file, a symlink, or a directory tree (never
// followed through a symlink).
func removeEntry(pfd int, base string) error {
	err := unix.Unlinkat(pfd, base, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) {
		return err
	}
	fd, err := unix.Openat(pfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	names, err := readNames(fd)
	if err == nil {
		for _, n := range names {
			if err = removeEntry(fd, n); err != nil {
				break
			}
		}
	}
	unix.Close(fd)
	if err != nil {
		return err
	}
	return unix.Unlinkat(pfd, base, unix.AT_REMOVEDIR)
}

func readNames(fd int) ([]string, error) {
	var names []string
	buf := make([]byte, 8192)
	for {
		n, err := unix.ReadDirent(fd, buf)
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return names, nil
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
}

func typeName(t byte) string {
	switch t {
	case tar.TypeDir:
		return "directory"
	case tar.TypeReg: // the reader reports the old TypeRegA as TypeReg
		return "file"
	case tar.TypeSymlink:
		return "symlink"
	case tar.TypeLink:
		return "hard link"
	case tar.TypeChar, tar.TypeBlock:
		return "device"
	case tar.TypeFifo:
		return "fifo"
	}
	return fmt.Sprintf("%q", t)
}
