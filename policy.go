package gvisor

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/netcell"
)

// The host-side policy a document must meet besides its own validity: what it may bind into a
// cell, which user it may run as, and the limits it gets when it declares none. A cell must not be
// able to write any file the library reads back — its own bundle's or another cell's — nor reach
// the host's namespaces and kernel interfaces, so the directories the library keeps its state in
// can never be a cell's mount.

// protectedDirs are the host directories no bind source or image root may equal, lie inside or
// contain: the library's own state and the host's namespaces and kernel interfaces.
func protectedDirs(loc location, imageStore string) []string {
	return []string{loc.root, loc.runsc.Root, imageStore, netcell.NetnsDir, "/proc", "/sys", "/dev"}
}

// resolve returns path with every symlink resolved, or the cleaned path when it does not exist.
func resolve(path string) string {
	if r, err := filepath.EvalSymlinks(path); err == nil {
		return r
	}
	return filepath.Clean(path)
}

// within reports whether path is dir or lies below it.
func within(path, dir string) bool {
	return path == dir || dir == "/" || strings.HasPrefix(path, dir+"/")
}

// overlapsProtected returns the protected directory a (resolved) path equals, lies in or
// contains, or "".
func overlapsProtected(path string, protected []string) string {
	for _, p := range protected {
		for _, d := range []string{p, resolve(p)} {
			if within(path, d) || within(d, path) {
				return p
			}
		}
	}
	return ""
}

// checkPolicy refuses what the operator's policy does not allow, naming each field. sources gets
// the resolved bind sources by mount index: config.json names those, not the document's paths, so
// that a symlink swapped after the check cannot redirect a mount.
func (b *Backend) checkPolicy(s *cellos.CellSpec, loc location) (sources map[int]string, err error) {
	var errs cellos.FieldErrors
	protected := protectedDirs(loc, b.imageStoreDir())
	if u := s.Run.EffectiveUser(); !b.opts.allowRoot && (u.UID == 0 || u.GID == 0) {
		errs = append(errs, cellos.FieldError{Field: "spec.run.user",
			Reason: fmt.Sprintf("uid %d gid %d: root inside the cell is refused unless the operator allows it (WithAllowRoot)", u.UID, u.GID)})
	}
	if r := s.Rootfs; r != nil && r.Image == "" {
		if p := overlapsProtected(resolve(r.Path), protected); p != "" {
			errs = append(errs, cellos.FieldError{Field: "spec.rootfs.path",
				Reason: fmt.Sprintf("%q overlaps %s, which the library protects from cells", r.Path, p)})
		}
	}
	for i, m := range s.Mounts {
		if m.Type != cellos.MountBind {
			continue
		}
		field := fmt.Sprintf("spec.mounts[%d].source", i)
		src := resolve(m.Source)
		if p := overlapsProtected(src, protected); p != "" {
			how := "is"
			switch {
			case src != filepath.Clean(m.Source):
				how = "resolves to " + src + ", which is"
			}
			reason := fmt.Sprintf("%q %s %s %s, which the library protects from cells", m.Source, how, relation(src, p), p)
			errs = append(errs, cellos.FieldError{Field: field, Reason: reason})
			continue
		}
		if len(b.opts.bindSources) > 0 && !allowedSource(src, b.opts.bindSources) {
			errs = append(errs, cellos.FieldError{Field: field,
				Reason: fmt.Sprintf("%q is not below the allowed bind sources %v (WithBindSources)", m.Source, b.opts.bindSources)})
			continue
		}
		if sources == nil {
			sources = map[int]string{}
		}
		sources[i] = src
	}
	if len(errs) > 0 {
		return nil, &cellos.Error{Op: "create", CellID: s.ID, Kind: cellos.ErrInvalidSpec, Err: errs}
	}
	return sources, nil
}

func relation(path, protected string) string {
	switch {
	case path == protected || path == resolve(protected):
		return "equal to"
	case within(path, protected) || within(path, resolve(protected)):
		return "inside"
	default:
		return "above"
	}
}

func allowedSource(src string, prefixes []string) bool {
	for _, p := range prefixes {
		if within(src, p) || within(src, resolve(p)) {
			return true
		}
	}
	return false
}

// checkUser refuses root in an Exec's process as in a document's.
func (b *Backend) checkUser(op, cellID string, u *cellos.UserSpec) error {
	if u == nil || b.opts.allowRoot || (u.UID != 0 && u.GID != 0) {
		return nil
	}
	return cellos.NewError(op, cellID, cellos.ErrInvalidSpec, cellos.FieldError{Field: "run.user",
		Reason: fmt.Sprintf("uid %d gid %d: root inside the cell is refused unless the operator allows it (WithAllowRoot)", u.UID, u.GID)})
}

// withDefaults returns doc with the Backend's default limits for what it leaves unset, as a copy
// when anything changes: the caller's document is never modified.
func (b *Backend) withDefaults(doc *cellos.ExecutionCellDocument) *cellos.ExecutionCellDocument {
	d := b.opts.defaults
	s := &doc.Spec
	var r cellos.ResourceSpec
	if s.Resources != nil {
		r = *s.Resources
	}
	changed := false
	if r.MemoryBytes == 0 && d.MemoryBytes > 0 {
		r.MemoryBytes, changed = d.MemoryBytes, true
	}
	if r.CPUMillis == 0 && d.CPUMillis > 0 {
		r.CPUMillis, changed = d.CPUMillis, true
	}
	ttl := s.TTLSeconds() == 0 && d.TTL > 0
	if !changed && !ttl {
		return doc
	}
	cp := *doc
	if changed {
		cp.Spec.Resources = &r
	}
	if ttl {
		cp.Spec.Lifetime = &cellos.LifetimeSpec{TTLSeconds: int64((d.TTL + 999_999_999) / 1_000_000_000)}
	}
	return &cp
}

// checkFreeSpace refuses a Create when the bundle root's filesystem is below the floor.
func (b *Backend) checkFreeSpace(root string) error {
	if b.opts.minFree <= 0 {
		return nil
	}
	free, err := freeBytes(root)
	if err != nil {
		return err
	}
	if free < uint64(b.opts.minFree) {
		return fmt.Errorf("the bundle root %s has %d bytes of free space, below the floor of %d (WithMinFreeSpace)", root, free, b.opts.minFree)
	}
	return nil
}

// freeBytes is the space available to the caller on the filesystem of path, or of its nearest
// existing ancestor (a root about to be created).
func freeBytes(path string) (uint64, error) {
	for {
		var st unix.Statfs_t
		err := unix.Statfs(path, &st)
		if err == nil {
			return st.Bavail * uint64(st.Bsize), nil
		}
		if !errors.Is(err, unix.ENOENT) || path == "/" {
			return 0, &os.PathError{Op: "statfs", Path: path, Err: err}
		}
		path = filepath.Dir(path)
	}
}
