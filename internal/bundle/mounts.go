package bundle

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/internal/owned"
)

// MountImage makes <bundle>/rootfs an overlay of the image directory with an upper layer on a
// small tmpfs of the bundle's own. runsc creates mount points inside the root it is given, even a
// read-only one; they land in the upper layer, never in the image.
func MountImage(dir *owned.Dir, image string) error {
	ov, err := dir.Mkdir(Overlay, 0o700)
	if err != nil {
		return err
	}
	defer ov.Close()
	if err := dir.Verify(); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", ov.Path(), "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=16m,mode=0700"); err != nil {
		return fmt.Errorf("mounting the overlay's tmpfs: %w", err)
	}
	upper, work := filepath.Join(ov.Path(), "upper"), filepath.Join(ov.Path(), "work")
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	opts := "lowerdir=" + image + ",upperdir=" + upper + ",workdir=" + work
	// nosuid and nodev: a setuid binary or a device node in the image means nothing on the host.
	if err := unix.Mount("overlay", filepath.Join(dir.Path(), Rootfs), "overlay", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		return fmt.Errorf("mounting the image %s as an overlay: %w", image, err)
	}
	return nil
}

// mountsUnder lists the mount points at or below dir in this mount namespace, deepest first.
func mountsUnder(dir string) ([]string, error) {
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.Mountpoint)
	}
	slices.SortFunc(out, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	return out, nil
}

// Remove deletes the bundle directory name of the bundle root after unmounting whatever is
// mounted inside it (an image's overlay, the control namespace); it refuses to delete while a
// mount remains, since that would delete the image behind it. An entry that is not a directory
// is removed without being followed.
func Remove(root *owned.Dir, name string) error {
	st, err := root.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return root.Remove(name)
	}
	if err := root.Verify(); err != nil {
		return err
	}
	bundle := filepath.Join(root.Path(), name)
	mounts, err := mountsUnder(bundle)
	if err != nil {
		return err
	}
	for _, m := range mounts {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("unmounting %s: %w", m, err)
		}
	}
	if left, err := mountsUnder(bundle); err != nil || len(left) > 0 {
		return fmt.Errorf("not removing %s: still mounted inside it: %v %v", bundle, left, err)
	}
	if err := root.RemoveAll(name); err != nil {
		return fmt.Errorf("removing the bundle: %w", err)
	}
	return nil
}
