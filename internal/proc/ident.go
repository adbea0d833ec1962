package proc

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Ident names one process across pid reuse: its pid and its start time in clock ticks since boot.
type Ident struct {
	Pid   int    `json:"pid"`
	Start uint64 `json:"start"`
}

// IdentOf returns the Ident of the running process pid.
func IdentOf(pid int) (Ident, error) {
	st, err := ReadStat(pid)
	if err != nil {
		return Ident{}, err
	}
	return Ident{Pid: pid, Start: st.Start}, nil
}

// Alive reports whether the process still runs (and is not a zombie).
func (id Ident) Alive() bool {
	if id.Pid <= 0 {
		return false
	}
	st, err := ReadStat(id.Pid)
	return err == nil && st.Start == id.Start && st.State != 'Z' && st.State != 'X'
}

// Open returns a handle on the process, checked after the pidfd is open to be the same process
// still (os.ErrProcessDone otherwise): a reused pid is never signalled through it.
func (id Ident) Open() (*Handle, error) {
	if id.Pid <= 0 {
		return nil, os.ErrProcessDone
	}
	h, err := Open(id.Pid)
	if err != nil {
		return nil, err
	}
	if !id.Alive() {
		_ = h.Close()
		return nil, os.ErrProcessDone
	}
	return h, nil
}

// Uids returns the real and effective user ids of pid.
func Uids(pid int) (real, effective int, err error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), "Uid:")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) < 2 {
			break
		}
		r, err1 := strconv.Atoi(f[0])
		e, err2 := strconv.Atoi(f[1])
		if err1 != nil || err2 != nil {
			break
		}
		return r, e, nil
	}
	return 0, 0, fmt.Errorf("/proc/%d/status: no Uid line", pid)
}

// FileIdent is a file's device and inode.
type FileIdent struct{ Dev, Ino uint64 }

// StatIdent returns the device and inode of the file at path (following it: /proc/<pid>/cwd and
// /proc/<pid>/exe name the files themselves).
func StatIdent(path string) (FileIdent, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return FileIdent{}, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return FileIdent{Dev: st.Dev, Ino: st.Ino}, nil
}

// Pids lists the pids of the processes of this pid namespace.
func Pids() ([]int, error) {
	d, err := os.Open("/proc")
	if err != nil {
		return nil, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	out := make([]int, 0, len(names))
	for _, n := range names {
		if pid, err := strconv.Atoi(n); err == nil && pid > 0 {
			out = append(out, pid)
		}
	}
	return out, nil
}

// KillTree sends SIGKILL to the process root names and to every process below it. Each
// descendant is signalled through a pidfd opened while it was still a child of a process of the
// tree (checked after opening), so a pid that was reused meanwhile is never signalled; the
// descendants are opened before anything is killed, since a dead parent's children move to
// another parent. It returns os.ErrProcessDone when root is gone already.
func KillTree(root Ident) error {
	h, err := root.Open()
	if err != nil {
		return err
	}
	defer h.Close()
	tree := map[int]bool{root.Pid: true}
	var handles []*Handle
	defer func() {
		for _, d := range handles {
			_ = d.Close()
		}
	}()
	for _, pid := range Descendants(root.Pid) {
		d, err := Open(pid)
		if err != nil {
			continue
		}
		st, err := ReadStat(pid)
		if err != nil || !tree[st.PPid] || st.Start < root.Start {
			_ = d.Close()
			continue
		}
		tree[pid] = true
		handles = append(handles, d)
	}
	var errs []error
	for i := len(handles) - 1; i >= 0; i-- { // children first
		if err := handles[i].Signal(unix.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
			errs = append(errs, err)
		}
	}
	if err := h.Signal(unix.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
