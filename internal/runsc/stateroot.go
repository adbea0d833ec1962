package runsc

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

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

// NullNetNS is runsc's name for the pinned namespace (runsc/specutils.NullNetNSFilename).
const NullNetNS = "null-netns"

// maxStackedMounts bounds the unmount loop; stacked pins come from concurrent cold starts.
const maxStackedMounts = 256

// ReleaseSharedState unmounts and removes runsc's pinned null network namespace from the state
// root when no container's state is left there. It is a no-op for Debian's runsc and while
// containers remain.
func (r *Runsc) ReleaseSharedState() error {
	entries, err := os.ReadDir(r.Root)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	pinned := false
	for _, e := range entries {
		if e.Name() != NullNetNS {
			return nil // a container's state: the namespace is still shared
		}
		pinned = true
	}
	if !pinned {
		return nil
	}
	path := filepath.Join(r.Root, NullNetNS)
	for i := 0; i < maxStackedMounts && unix.Unmount(path, unix.MNT_DETACH) == nil; i++ {
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing runsc's pinned network namespace %s: %w", path, err)
	}
	return nil
}
