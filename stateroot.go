package gvisor

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Current runsc pins an empty network namespace for its gofers in the state root: an nsfs bind
// mount at <--root>/null-netns (--shared-root defaults to --root), made by the first sandbox that
// finds none, shared by every later one, and never removed by runsc. Concurrent first starts may
// stack several mounts there. Debian's runsc has no such thing. A mount point cannot be removed
// (EBUSY), so the state root could never be deleted, and the namespace is kept alive for nothing.
//
// The library removes it once the state root holds no container: at the end of every teardown and
// of Recover. A sandbox starting at that moment is not harmed: it holds the namespace through a
// descriptor it opened, or, finding none, creates and pins a fresh one (which the next idle
// teardown removes). The cost is one network namespace per idle-to-busy transition, which is
// what runsc pays for every sandbox when the pin is not possible.

// nullNetNS is runsc's name for the pinned namespace (runsc/specutils.NullNetNSFilename).
const nullNetNS = "null-netns"

// maxStackedMounts bounds the unmount loop; stacked pins come from concurrent cold starts.
const maxStackedMounts = 256

// releaseSharedState unmounts and removes runsc's pinned null network namespace from the state
// root when no container's state is left there. It is a no-op for Debian's runsc and while
// containers remain.
func (r *runsc) releaseSharedState() error {
	entries, err := os.ReadDir(r.Root)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	pinned := false
	for _, e := range entries {
		if e.Name() != nullNetNS {
			return nil // a container's state: the namespace is still shared
		}
		pinned = true
	}
	if !pinned {
		return nil
	}
	path := filepath.Join(r.Root, nullNetNS)
	for i := 0; i < maxStackedMounts && unix.Unmount(path, unix.MNT_DETACH) == nil; i++ {
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing runsc's pinned network namespace %s: %w", path, err)
	}
	return nil
}

// releaseStateRoot runs releaseSharedState and logs what it could not do: the namespace is no
// cell's, so it never fails a teardown.
func (b *Backend) releaseStateRoot(r *runsc) {
	if err := r.releaseSharedState(); err != nil {
		b.log.Warn("cleaning runsc's state root", zap.String("root", r.Root), zap.Error(err))
	}
}
