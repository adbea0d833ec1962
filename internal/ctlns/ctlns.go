// Package ctlns gives each cell a network namespace of its own for runsc's control socket, and
// starts processes inside such a namespace.
//
// runsc before about 2023 serves a sandbox's control RPC on the abstract Unix socket
// @runsc-sandbox.<id>, bound in the network namespace of the runsc command that created the
// sandbox. Abstract sockets carry no permissions: anyone in that namespace can connect and, for
// a sandbox run as root, exec a process as uid 0 inside it. Running every runsc command of a
// cell inside a namespace that only root can enter (an empty one, pinned by a bind mount on a
// file) takes the socket out of everyone else's reach. Newer runsc serves a file socket in its
// state root instead; for it the namespace changes nothing.
//
// A process starts inside a namespace without a helper process: a goroutine locks itself to its
// OS thread, moves that thread into the namespace with setns(2), starts the process (the child
// is forked from that thread and inherits its namespace) and moves the thread back. A thread
// that cannot be moved back is never handed back to the Go scheduler: it ends with the
// goroutine, so no other goroutine ever runs in a namespace it did not ask for.
package ctlns

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"

	"golang.org/x/sys/unix"
)

// ErrNotNamespace is returned (wrapped) by Start and Run for a path that is not a pinned
// network namespace.
var ErrNotNamespace = errors.New("not a network namespace")

// threadNS is the calling thread's own network namespace, as a magic link that always names the
// thread rather than the thread group's leader.
const threadNS = "/proc/thread-self/ns/net"

// maxUnmounts bounds how many stacked namespace mounts Remove detaches from one path.
const maxUnmounts = 16

// Create makes a new, empty network namespace (loopback only, down) and pins it with a bind
// mount on a new file at path, which must not exist. The namespace lives until Remove unpins it
// and no process or socket uses it any more. On failure nothing is left at path.
func Create(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o400)
	if err != nil {
		return fmt.Errorf("creating the namespace pin %s: %w", path, &os.PathError{Op: "open", Path: path, Err: err})
	}
	_ = unix.Close(fd)
	err = onThread(func(thread *os.File) error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
		}
		if err := unix.Mount(threadNS, path, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("pinning the namespace at %s: %w", path, err)
		}
		return nil
	})
	if err != nil {
		_ = Remove(path)
		return err
	}
	return nil
}

// Remove unpins the namespace at path (every namespace mount stacked there) and removes the
// file. The kernel frees the namespace once nothing else holds it. A missing path is not an
// error.
func Remove(path string) error {
	for i := 0; ; i++ {
		pinned, err := isNSFS(path)
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("unpinning the namespace at %s: %w", path, err)
		}
		if !pinned {
			break
		}
		if i == maxUnmounts {
			return fmt.Errorf("unpinning the namespace at %s: still mounted after %d unmounts", path, maxUnmounts)
		}
		if err := unix.Unmount(path, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil {
			return fmt.Errorf("unpinning the namespace at %s: %w", path, err)
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the namespace pin: %w", err)
	}
	return nil
}

// isNSFS tells whether path (not followed if a symbolic link) is a namespace file: whether a
// namespace is mounted there.
func isNSFS(path string) (bool, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, err
	}
	defer unix.Close(fd)
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return false, err
	}
	return st.Type == unix.NSFS_MAGIC, nil
}

// Start starts cmd inside the network namespace pinned at path (see Create). Only the new
// process is in that namespace; the caller's threads are not. cmd's I/O goroutines, if any, run
// in the caller's namespace, which matters to nothing they do.
//
// A cmd with SysProcAttr.Pdeathsig receives that signal if the thread it was started from
// exits; Start keeps that thread alive for the process, except in the one case it cannot move
// the thread back to its namespace (then the thread ends).
func Start(cmd *exec.Cmd, path string) error {
	ns, err := Open(path)
	if err != nil {
		return err
	}
	defer ns.Close()
	return onThread(func(*os.File) error {
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("entering the network namespace %s: %w", path, err)
		}
		return cmd.Start()
	})
}

// Run starts cmd as Start does and waits for it to finish, as cmd.Run does.
func Run(cmd *exec.Cmd, path string) error {
	if err := Start(cmd, path); err != nil {
		return err
	}
	return cmd.Wait()
}

// Open opens the network namespace pinned at path and checks that it is one: a namespace file
// (nsfs) of type network. The final component of path is not followed if it is a symbolic link.
func Open(path string) (*os.File, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening the network namespace: %w", &os.PathError{Op: "open", Path: path, Err: err})
	}
	f := os.NewFile(uintptr(fd), path)
	if err := checkNetNS(fd); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

func checkNetNS(fd int) error {
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return fmt.Errorf("fstatfs: %w", err)
	}
	if st.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("%w: not a namespace file (filesystem type %#x, not nsfs)", ErrNotNamespace, st.Type)
	}
	typ, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil {
		return fmt.Errorf("NS_GET_NSTYPE: %w", err)
	}
	if typ != unix.CLONE_NEWNET {
		return fmt.Errorf("%w: a namespace of another type (%#x)", ErrNotNamespace, typ)
	}
	return nil
}

// onThread runs f on a goroutine locked to its OS thread, then moves that thread back to the
// network namespace it had before f (f gets it open). If the thread cannot be moved back, it
// stays locked and ends with the goroutine.
func onThread(f func(thread *os.File) error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		thread, err := os.Open(threadNS)
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("opening this thread's network namespace: %w", err)
			return
		}
		defer thread.Close()
		err = f(thread)
		if rerr := unix.Setns(int(thread.Fd()), unix.CLONE_NEWNET); rerr != nil {
			// Keep the thread locked: it exits with this goroutine. What f did stands.
			done <- err
			return
		}
		runtime.UnlockOSThread()
		done <- err
	}()
	return <-done
}
