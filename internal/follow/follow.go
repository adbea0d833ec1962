// Package follow copies what other processes append to files into writers as it arrives, the
// way `tail -f` does, woken by inotify rather than by polling.
package follow

import (
	"errors"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Stream is one file to follow and where its content goes.
type Stream struct {
	Path string
	To   io.Writer
}

// Follower copies streams from their first byte until stopped.
type Follower struct {
	ino   *os.File
	files []*os.File
	to    []io.Writer
	stop  chan struct{}
	done  chan struct{}
}

// Start opens the files and starts copying. A writer that fails is dropped; the others go on.
func Start(streams []Stream) (*Follower, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	f := &Follower{ino: os.NewFile(uintptr(fd), "inotify"), stop: make(chan struct{}), done: make(chan struct{})}
	for _, s := range streams {
		if _, err := unix.InotifyAddWatch(fd, s.Path, unix.IN_MODIFY); err != nil {
			f.close()
			return nil, &os.PathError{Op: "inotify_add_watch", Path: s.Path, Err: err}
		}
		file, err := os.Open(s.Path)
		if err != nil {
			f.close()
			return nil, err
		}
		f.files = append(f.files, file)
		f.to = append(f.to, s.To)
	}
	go f.run()
	return f, nil
}

func (f *Follower) close() {
	_ = f.ino.Close()
	for _, file := range f.files {
		_ = file.Close()
	}
}

func (f *Follower) run() {
	defer close(f.done)
	defer f.close()
	go func() {
		select {
		case <-f.stop:
			_ = f.ino.SetReadDeadline(time.Unix(1, 0))
		case <-f.done:
		}
	}()
	events := make([]byte, 4096)
	buf := make([]byte, 64<<10)
	for {
		f.copyAll(buf)
		if _, err := f.ino.Read(events); err != nil {
			f.copyAll(buf) // what was written before the stop
			return
		}
	}
}

func (f *Follower) copyAll(buf []byte) {
	for i, file := range f.files {
		for {
			n, err := file.Read(buf)
			if n > 0 && f.to[i] != nil {
				if _, werr := f.to[i].Write(buf[:n]); werr != nil {
					f.to[i] = nil
				}
			}
			if err != nil || n == 0 {
				if err != nil && !errors.Is(err, io.EOF) {
					f.to[i] = nil
				}
				break
			}
		}
	}
}

// Stop copies what the files hold now and stops. The writers have received everything written
// to the files before Stop was called when it returns.
func (f *Follower) Stop() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	<-f.done
}
