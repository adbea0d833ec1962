// Package proc waits for processes that need not be children of the caller, through pidfds.
package proc

import (
	"context"
	"errors"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Handle refers to one process through a pidfd, so pid reuse cannot confuse it.
type Handle struct{ f *os.File }

// Open returns a handle on pid. A process that no longer exists gives os.ErrProcessDone.
func Open(pid int) (*Handle, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		return nil, os.ErrProcessDone
	}
	if err != nil {
		return nil, os.NewSyscallError("pidfd_open", err)
	}
	return &Handle{f: os.NewFile(uintptr(fd), "pidfd")}, nil
}

// Wait blocks until the process has exited (it may still await reaping by its parent) or ctx is
// done. It parks the goroutine in the runtime's poller, not an OS thread.
func (h *Handle) Wait(ctx context.Context) error {
	if err := h.f.SetReadDeadline(time.Time{}); err != nil {
		return err
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = h.f.SetReadDeadline(time.Unix(1, 0))
		close(fired)
	})
	defer func() {
		if !stop() {
			<-fired // the deadline is set; the next Wait clears it
		}
	}()
	rc, err := h.f.SyscallConn()
	if err != nil {
		return err
	}
	err = rc.Read(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, perr := unix.Poll(fds, 0)
		return perr != nil || n > 0
	})
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// Exited reports whether the process has exited, without blocking.
func (h *Handle) Exited() bool {
	rc, err := h.f.SyscallConn()
	if err != nil {
		return false
	}
	n := 0
	_ = rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, _ = unix.Poll(fds, 0)
	})
	return n > 0
}

// Signal sends sig to the process.
func (h *Handle) Signal(sig unix.Signal) error {
	rc, err := h.f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); err != nil {
		return err
	}
	if errors.Is(serr, unix.ESRCH) {
		return os.ErrProcessDone
	}
	return serr
}

// Close releases the pidfd.
func (h *Handle) Close() error { return h.f.Close() }
