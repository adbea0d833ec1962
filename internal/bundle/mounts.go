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
func MountImage(dir *owned.Dir, image string) error { return MountLayers(dir, []string{image}) }

// MountLayers makes <bundle>/rootfs an overlay of the layer directories, lowest first, with an
// upper layer on a small tmpfs of the bundle's own, as MountImage does with one directory.
func MountLayers(dir *owned.Dir, layers []string) error {
	if len(layers) == 0 {
		return errors.New("an overlay needs at least one layer")
	}
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
	target := filepath.Join(dir.Path(), Rootfs)
	// overlayfs lists the uppermost lower layer first.
	lower := slices.Clone(layers)
	slices.Reverse(lower)
	opts := "lowerdir=" + strings.Join(lower, ":") + ",upperdir=" + upper + ",workdir=" + work
	if len(opts) < 4000 && !slices.ContainsFunc(lower, func(l string) bool { return strings.ContainsAny(l, overlayUnsafe) }) {
		// nosuid and nodev: a setuid binary or a device node in the image means nothing on the host.
		if err := unix.Mount("overlay", target, "overlay", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
			return fmt.Errorf("mounting %s as an overlay: %w", describeLayers(layers), err)
		}
		return nil
	}
	// Too long for mount(2)'s one page of options, or a path it cannot express: the mount API
	// takes one layer per call, unescaped (Linux 6.8+).
	if err := mountOverlayAPI(target, lower, upper, work); err != nil {
		return fmt.Errorf("mounting %s as an overlay: %w", describeLayers(layers), err)
	}
	return nil
}

func describeLayers(layers []string) string {
	if len(layers) == 1 {
		return "the image " + layers[0]
	}
	return fmt.Sprintf("%d image layers", len(layers))
}

// fsconfigDir sets a directory parameter of an overlay by descriptor (Linux 6.13), which knows no
// length limit; older kernels take a path of at most 256 bytes (lowerdir+ from Linux 6.8).
func fsconfigDir(fsfd int, key, dir string) error {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	err = unix.FsconfigSetFd(fsfd, key, fd)
	if err == nil || !errors.Is(err, unix.EINVAL) {
		return err
	}
	if err := unix.FsconfigSetString(fsfd, key, dir); err != nil {
		return fmt.Errorf("%w (by path, at most 256 bytes: needs Linux 6.8; by descriptor, any length: Linux 6.13)", err)
	}
	return nil
}

// mountOverlayAPI mounts an overlay through fsopen/fsconfig/fsmount/move_mount.
func mountOverlayAPI(target string, lower []string, upper, work string) error {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fsopen: %w", err)
	}
	defer unix.Close(fsfd)
	for _, l := range lower {
		if err := fsconfigDir(fsfd, "lowerdir+", l); err != nil {
			return fmt.Errorf("layer %s: %w", l, err)
		}
	}
	if err := fsconfigDir(fsfd, "upperdir", upper); err != nil {
		return fmt.Errorf("upperdir: %w", err)
	}
	if err := fsconfigDir(fsfd, "workdir", work); err != nil {
		return fmt.Errorf("workdir: %w", err)
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return fmt.Errorf("creating the overlay: %w", err)
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_NOSUID|unix.MOUNT_ATTR_NODEV)
	if err != nil {
		return fmt.Errorf("fsmount: %w", err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount: %w", err)
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
