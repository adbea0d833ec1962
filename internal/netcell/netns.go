package netcell

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// lockHost takes the host-wide lock that orders every change to cells' networks, across
// processes: flock(2) on NetnsDir, which exists wherever named namespaces do and which nothing
// else locks. Each call opens its own descriptor, so goroutines of one process exclude each other
// as processes do.
func lockHost(ctx context.Context) (func(), error) {
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", NetnsDir, err)
	}
	f, err := os.Open(NetnsDir)
	if err != nil {
		return nil, err
	}
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() {
				_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
				_ = f.Close()
			}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			_ = f.Close()
			return nil, fmt.Errorf("locking %s: %w", NetnsDir, err)
		}
		select {
		case <-ctx.Done():
			_ = f.Close()
			return nil, fmt.Errorf("waiting for the host's network lock (%s): %w", NetnsDir, ctx.Err())
		case <-time.After(delay):
		}
	}
}

// ensureNetnsDir makes NetnsDir a shared mount point, as `ip netns add` does: unmounting a
// namespace there then also unmounts the copies that other mount namespaces made of it (a
// sandbox that started meanwhile), so the namespace is freed at once.
func ensureNetnsDir() error {
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return err
	}
	made := false
	for {
		err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EINVAL) || made {
			return fmt.Errorf("making %s a shared mount: %w", NetnsDir, err)
		}
		if err := unix.Mount(NetnsDir, NetnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("making %s a mount point: %w", NetnsDir, err)
		}
		made = true
	}
}

// createNetns makes a new network namespace, pins it with a bind mount at path, and runs inside
// in it (host is the caller's namespace, for moving things there). It runs on a thread of its
// own that it never hands back to the Go scheduler: a thread whose namespace has changed is
// discarded when its goroutine ends, so no other goroutine ever runs in the cell's namespace.
func createNetns(path string, inside func(host *os.File) error) error {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("network namespace %s: %w", path, ErrExists)
		}
		return fmt.Errorf("creating the namespace's mount point: %w", err)
	}
	_ = f.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		host, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			done <- err
			return
		}
		defer host.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
			return
		}
		if err := unix.Mount("/proc/thread-self/ns/net", path, "none", unix.MS_BIND, ""); err != nil {
			done <- fmt.Errorf("pinning the namespace at %s: %w", path, err)
			return
		}
		if inside != nil {
			err = inside(host)
		}
		done <- err
	}()
	if err := <-done; err != nil {
		_ = removeNetns(path)
		return err
	}
	return nil
}

// removeNetns unpins a namespace made by createNetns and removes its mount point; the kernel
// frees the namespace, and the interfaces left in it, once nothing else holds it. It unmounts
// network namespaces only and removes only an empty file: a directory, a symbolic link, a file
// with any other file system mounted on it or with contents is left alone and reported.
func removeNetns(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("removing the network namespace %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("removing the network namespace %s: not a namespace's mount point (%v), left alone", path, fi.Mode().Type())
	}
	for i := 0; i < 16; i++ { // a pin can be stacked; detach them all
		var st unix.Statfs_t
		if err := unix.Statfs(path, &st); err != nil || st.Type != unix.NSFS_MAGIC {
			break
		}
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
				break
			}
			return fmt.Errorf("unmounting the network namespace %s: %w", path, err)
		}
	}
	// What is left is the empty file createNetns made; anything else is not removed.
	if fi, err := os.Lstat(path); err == nil && (!fi.Mode().IsRegular() || fi.Size() != 0) {
		return fmt.Errorf("removing the network namespace %s: not a namespace's mount point (a file of %d bytes), left alone", path, fi.Size())
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the network namespace %s: %w", path, err)
	}
	return nil
}

// checkNetnsPath refuses a path that is not absolute and clean or whose last element is not a
// plain name (CheckName).
func checkNetnsPath(path string) error {
	if !filepath.IsAbs(path) || filepath.Clean(path) != path {
		return fmt.Errorf("netcell: %q is not an absolute, clean path", path)
	}
	return CheckName(filepath.Base(path))
}

// CreateNetns makes an empty network namespace (loopback only) pinned at path, for probing a
// runtime; RemoveNetns removes it. Both refuse a path that is not absolute and clean, or whose
// last element is not a plain name.
func CreateNetns(path string) error {
	if err := checkNetnsPath(path); err != nil {
		return err
	}
	return createNetns(path, nil)
}

// RemoveNetns removes a namespace made by CreateNetns.
func RemoveNetns(path string) error {
	if err := checkNetnsPath(path); err != nil {
		return err
	}
	return removeNetns(path)
}
