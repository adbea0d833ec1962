package gvisor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"go.uber.org/zap"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
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
func (b *Backend) Recover(ctx context.Context) (RecoveryReport, error) {
	const op = "recover"
	var rep RecoveryReport
	var errs []error
	loc := b.locate()
	entries, err := os.ReadDir(loc.root)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return rep, cellos.NewError(op, "", cellos.ErrHost, err)
	}
	seen := map[string]bool{}
	for _, en := range entries {
		id := en.Name()
		if strings.HasPrefix(id, ".") || !cellos.ValidID(id) {
			if id != filepath.Base(loc.runsc.Root) && id != poolDirName {
				b.log.Warn("ignoring an entry of the bundle root that is not a cell", zap.String("name", id))
			}
			continue
		}
		if err := ctx.Err(); err != nil {
			return rep, cellos.NewError(op, "", cellos.ErrHost, err)
		}
		seen[id] = true
		adopted, found, err := b.recoverCell(loc, id)
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
	if err := b.recoverPool(ctx, loc); err != nil { // idle warm-pool sandboxes (pool.go): removed, never listed
		errs = append(errs, err)
	}
	// runsc state whose bundle is gone: Create or Destroy was interrupted. runsc is asked (for the
	// bundle paths) only when the state root names a container no bundle accounts for.
	if loc.runscErr == nil && unaccountedState(loc, seen) {
		if _, err := os.Stat(loc.runsc.Root); err == nil {
			states, err := loc.runsc.List(ctx)
			if err != nil {
				errs = append(errs, err)
			}
			for _, st := range states {
				if isPoolRunscID(st.ID) {
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
				seen[id] = true
				_, found, err := b.recoverCell(loc, id)
				if found {
					rep.Cleaned = append(rep.Cleaned, id)
				}
				if err != nil {
					errs = append(errs, err)
				}
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
func unaccountedState(loc location, seen map[string]bool) bool {
	ids, other := loc.runsc.stateIDs()
	if other {
		return true
	}
	known := make(map[string]bool, len(seen))
	for id := range seen {
		known[RunscID(loc.root, id)] = true
	}
	for id := range ids {
		if !isPoolRunscID(id) && !known[id] {
			return true
		}
	}
	return false
}

// recoverCell adopts or cleans one cell. found is false when the id is tracked or busy here.
func (b *Backend) recoverCell(loc location, id string) (adopted, found bool, err error) {
	c := b.newCell(id, loc)
	if b.cells.claim(c) != nil {
		return false, false, nil
	}
	if b.adopt(c) {
		return true, true, nil
	}
	close(c.ready)
	done, _ := b.cells.beginTeardown(c)
	_, err = b.destroyClaimed(c, done)
	return false, true, err
}

// adopt tracks c, which the caller claimed, when its shim still runs or recorded the cell's end,
// and reports whether it did. Otherwise c is left as it was (ready still open).
func (b *Backend) adopt(c *cell) bool {
	id := c.id
	if fi, err := os.Lstat(c.paths.bundle); err != nil || !fi.IsDir() {
		return false
	}
	var pid pidRecord
	_ = readJSON(filepath.Join(c.paths.bundle, fileShimPid), &pid)
	shim, _ := openShim(pid, c.paths.bundle)
	if shim != nil {
		_ = shim.Close()
	}
	if _, err := os.Stat(filepath.Join(c.paths.bundle, fileExit)); shim == nil && err != nil {
		return false
	}
	c.pid = pid
	if b.cg != nil && len(b.cg.Dirs(c.paths.runscID)) > 0 {
		cgPath := cgroups.Path(c.paths.runscID)
		c.handle.CgroupPath = &cgPath
		c.memory = b.cg.MemoryDir(c.paths.runscID)
	}
	c.handle.CellID = id
	b.adoptNetwork(c)
	c.created = true
	close(c.ready)
	b.startWatching(c)
	return true
}
