package gvisor

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cellos/cellos-host-gvisor/internal/pool"
	"github.com/cellos/cellos-host-gvisor/internal/shim"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	"go.uber.org/zap"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
	"github.com/cellos/cellos-host-gvisor/internal/proc"
)

// RecoveryReport lists what Recover found. Every cell found is in exactly one list.
type RecoveryReport struct {
	Adopted []string // now tracked: WaitForExit returns their exit status, Destroy cleans them
	Cleaned []string // could not be adopted and were removed completely
}

// Recover finds the cells a previous Backend on the same bundle root left behind — after a crash,
// an upgrade or a restart — and adopts or cleans each of them. A cell is adopted when its shim
// still runs (it goes on running, its output keeps flowing to its files and, with WithOutput, to
// the writers from its first byte) or when its shim recorded its exit. A cell whose shim died
// without recording an exit, a bundle that Create never finished and runsc state without a
// bundle are cleaned as Destroy would. Cells this Backend already tracks are left alone. Call it
// once at supervisor start, before creating cells.
//
// Only what is the library's is touched: a bundle root that breaks the ownership rule is refused
// whole, and an entry of it without the library's marker (a directory of the euid's own, holding
// cellos.json for that id) is skipped with a warning, never removed.
func (b *Backend) Recover(ctx context.Context) (RecoveryReport, error) {
	const op = "recover"
	var rep RecoveryReport
	var errs []error
	loc := b.locate()
	root, err := openExistingRoot(loc)
	if err != nil {
		return rep, cellos.NewError(op, "", cellos.ErrHost, err)
	}
	if root == nil {
		return rep, nil
	}
	defer root.Close()
	names, err := root.Entries()
	if err != nil {
		return rep, cellos.NewError(op, "", cellos.ErrHost, err)
	}
	shims := shim.FindAll()
	seen := map[string]bool{}
	for _, id := range names {
		if strings.HasPrefix(id, ".") || !cellos.ValidID(id) {
			if id != filepath.Base(loc.runsc.Root) && id != pool.DirName {
				b.log.Warn("ignoring an entry of the bundle root that is not a cell", zap.String("name", id))
			}
			continue
		}
		if err := ctx.Err(); err != nil {
			return rep, cellos.NewError(op, "", cellos.ErrHost, err)
		}
		adopted, found, err := b.recoverCell(loc, root, id, shims)
		if found {
			seen[id] = true
		}
		switch {
		case !found:
		case adopted:
			rep.Adopted = append(rep.Adopted, id)
		default:
			rep.Cleaned = append(rep.Cleaned, id)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	// Idle warm-pool sandboxes: removed, never listed.
	if err := b.pool.RemoveLeftovers(ctx, pool.Leftovers{Root: root, Runsc: *loc.runsc, Confine: b.root, Cgroups: b.cg, Log: b.log, Shims: shims}); err != nil {
		errs = append(errs, err)
	}
	// runsc state whose bundle is gone: Create or Destroy was interrupted. runsc is asked (for the
	// bundle paths) only when the state root names a container no bundle accounts for.
	if loc.runscErr == nil && b.unaccountedState(loc, root, seen) {
		states, err := loc.runsc.List(ctx)
		if err != nil {
			errs = append(errs, err)
		}
		for _, st := range states {
			if runsc.IsPoolID(st.ID) {
				continue // a pool sandbox, idle (recoverPool) or a pooled cell's (recoverCell)
			}
			id := filepath.Base(st.Bundle)
			if filepath.Dir(st.Bundle) != loc.root || !cellos.ValidID(id) || st.ID != RunscID(loc.root, id) {
				b.log.Warn("runsc state root holds a container that is not this library's", zap.String("runscId", st.ID), zap.String("bundle", st.Bundle))
				continue
			}
			if seen[id] {
				continue
			}
			if _, err := root.Lstat(id); err == nil {
				continue // an entry recoverCell skipped: not the library's to clean
			}
			seen[id] = true
			_, found, err := b.recoverCell(loc, root, id, shims)
			if found {
				rep.Cleaned = append(rep.Cleaned, id)
			}
			if err != nil {
				errs = append(errs, err)
			}
		}
	}
	b.releaseStateRoot(loc.runsc) // current runsc's pinned null-netns, when no container is left
	slices.Sort(rep.Adopted)
	slices.Sort(rep.Cleaned)
	b.log.Info("recovered cells", zap.Strings("adopted", rep.Adopted), zap.Strings("cleaned", rep.Cleaned))
	if len(errs) > 0 {
		return rep, cellos.NewError(op, "", cellos.ErrHost, errors.Join(errs...))
	}
	return rep, nil
}

// unaccountedState reports whether the state root has entries that are neither a pool sandbox's
// nor a container of a bundle seen in the bundle root.
func (b *Backend) unaccountedState(loc location, root *owned.Dir, seen map[string]bool) bool {
	ids, other := loc.runsc.StateIDs()
	if other {
		return true
	}
	known := make(map[string]bool, len(seen))
	for id := range seen {
		known[RunscID(loc.root, id)] = true
	}
	for id := range ids {
		if !runsc.IsPoolID(id) && !known[id] {
			return true
		}
	}
	return false
}

// recoverCell adopts or cleans one cell. found is false when the id is tracked or busy here, or
// when its entry is not the library's (skipped with a warning).
func (b *Backend) recoverCell(loc location, root *owned.Dir, id string, shims map[proc.FileIdent]proc.Ident) (adopted, found bool, err error) {
	c := b.newCell(id, loc)
	if b.cells.claim(c) != nil {
		return false, false, nil
	}
	release := func() {
		b.cells.release(c)
		close(c.ready)
	}
	if _, err := root.Lstat(id); err == nil {
		if _, err := b.openBundle(c, root); err != nil {
			b.log.Warn("skipping an entry of the bundle root that is not the library's", zap.String("name", id), zap.Error(err))
			release()
			return false, false, nil
		}
		if !bundle.HasMarker(c.dir, id) {
			if names, err := c.dir.Entries(); err == nil && len(names) == 0 {
				_ = c.dir.Close()
				c.dir = nil
				release()
				// A Create that died between making the directory and its marker: empty.
				return false, false, root.Remove(id)
			}
			b.log.Warn("skipping a directory of the bundle root without the library's marker", zap.String("name", id))
			_ = c.dir.Close()
			release()
			return false, false, nil
		}
		if b.adopt(c, shims) {
			return true, true, nil
		}
	}
	close(c.ready)
	done, _ := b.cells.beginTeardown(c)
	_, err = b.destroyClaimed(c, done)
	return false, true, err
}

// adopt tracks c, whose bundle the caller opened (c.dir), when its shim still runs or recorded
// the cell's end, and reports whether it did. Otherwise c is left as it was (ready still open).
func (b *Backend) adopt(c *cell, shims map[proc.FileIdent]proc.Ident) bool {
	dev, ino := c.dir.Ident()
	pid, running := shims[proc.FileIdent{Dev: dev, Ino: ino}]
	if _, err := c.dir.Lstat(bundle.Exit); !running && err != nil {
		return false
	}
	c.pid = pid
	if b.cg != nil && len(b.cg.Dirs(c.paths.runscID)) > 0 {
		cgPath := cgroups.Path(c.paths.runscID)
		c.handle.CgroupPath = &cgPath
		c.memory = b.cg.MemoryDir(c.paths.runscID)
	}
	c.handle.CellID = c.id
	b.adoptNetwork(c)
	c.created = true
	close(c.ready)
	b.startWatching(c)
	return true
}
