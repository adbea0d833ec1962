package gvisor

import (
	"bufio"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/cellos/cellos-host-gvisor/internal/owned"
	"github.com/cellos/cellos-host-gvisor/internal/proc"
)

// The supervisor's side of the processes it re-executes from its own binary — cells' shims and
// warm-pool keepers — and how it recognises them later, from any process.
//
// A spare shim is a shim started ahead of the next Create. Starting the shim is the one step the
// library adds to a cell's start-up path before runsc runs, and most of it is the Go runtime and
// package initialisation of the program the library is linked into (15–20 ms for a small binary
// on a 2-core VM, more for a large one). A spare has done that already: Create sends it its
// request, and it starts runsc at once. From then on it is the cell's shim like any other.
//
// The next spare is started when a cell exits, or spareDelay after a Create, whichever comes
// first: starting it right after a Create would take CPU from that cell's sandbox while it boots
// (on 2 cores that cost a trivial cell ~5 % of its create -> exit time). A Create that finds no
// spare starts its shim itself. An unclaimed spare exits when its request pipe closes: Close, or
// the supervisor's death.

// spareDelay is how long after a Create the next spare is started at the latest.
const spareDelay = time.Second

// shimProc is a started shim or keeper: the process, its identity, the read end of its answer
// pipe (its fd 3) and the write end of its request pipe (its fd 4).
type shimProc struct {
	cmd      *exec.Cmd
	ident    proc.Ident
	answers  *os.File
	rd       *bufio.Reader
	requests *os.File
	exited   chan struct{} // closed once the process has exited and been reaped
}

// startShimProc starts this binary as argv0 (a shim or a keeper): in a session of its own, with
// the shim environment, in /, with its output to /dev/null until it takes its bundle's log.
func startShimProc(argv0 string) (*shimProc, error) {
	answersR, answersW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	requestsR, requestsW, err := os.Pipe()
	if err != nil {
		_ = answersR.Close()
		_ = answersW.Close()
		return nil, err
	}
	cmd := &exec.Cmd{
		Path:        "/proc/self/exe",
		Args:        []string{argv0},
		Env:         shimEnviron(),
		Dir:         "/",
		ExtraFiles:  []*os.File{answersW, requestsR},
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	err = cmd.Start()
	_ = answersW.Close()
	_ = requestsR.Close()
	if err != nil {
		_ = answersR.Close()
		_ = requestsW.Close()
		return nil, err
	}
	exited := make(chan struct{})
	// The reaper holds the process only, not the pipes: a spare of a Backend that was never
	// closed sees its request pipe close when the Backend is collected, exits and is reaped.
	go func() { _ = cmd.Wait(); close(exited) }()
	s := &shimProc{cmd: cmd, answers: answersR, rd: bufio.NewReader(answersR), requests: requestsW, exited: exited}
	if s.ident, err = proc.IdentOf(cmd.Process.Pid); err != nil {
		s.discard()
		return nil, err
	}
	return s, nil
}

// wait blocks until the process has exited, within d; false when it has not.
func (s *shimProc) wait(d time.Duration) bool {
	select {
	case <-s.exited:
		return true
	case <-time.After(d):
		return false
	}
}

// send writes one request. It fails when the process is gone (its end of the pipe closed).
func (s *shimProc) send(v any) error { return sendRequest(s.requests, v) }

// discard ends a shim that serves no cell: it exits when its request pipe closes.
func (s *shimProc) discard() {
	_ = s.requests.Close()
	_ = s.answers.Close()
	if !s.wait(shimExitGrace) {
		_ = s.cmd.Process.Kill() // through its pidfd: never another process
		<-s.exited
	}
}

// shimEnviron is the shim's environment: the program's, with the shim marker. A binary built with
// -race (tests) would otherwise sleep a second before exiting; the setting is inert otherwise.
func shimEnviron() []string {
	env := shimChildEnv()
	race := "atexit_sleep_ms=0"
	if v := os.Getenv("GORACE"); v != "" {
		race = v + " " + race
	}
	return append(env, "GORACE="+race, shimEnv+"=1")
}

// spares holds at most one spare shim.
type spares struct {
	mu       sync.Mutex
	s        *shimProc
	starting sync.WaitGroup // a spare being started, outside mu: Creates do not wait for it
	busy     bool           // one is being started
	disabled bool           // WithSpareShim(false), or after Close
}

// take returns the spare, if there is one that was started with the current environment.
func (sp *spares) take() *shimProc {
	sp.mu.Lock()
	s := sp.s
	sp.s = nil
	sp.mu.Unlock()
	if s != nil && !slices.Equal(s.cmd.Env, shimEnviron()) { // started with another environment
		s.discard()
		return nil
	}
	return s
}

// refillSpare starts a spare when there is none.
func (b *Backend) refillSpare() {
	sp := &b.spares
	sp.mu.Lock()
	if sp.disabled || sp.s != nil || sp.busy {
		sp.mu.Unlock()
		return
	}
	sp.busy = true
	sp.starting.Add(1)
	sp.mu.Unlock()
	defer sp.starting.Done()

	s, err := startShimProc(shimArgv0)
	sp.mu.Lock()
	sp.busy = false
	keep := err == nil && !sp.disabled && sp.s == nil
	if keep {
		sp.s = s
	}
	sp.mu.Unlock()
	switch {
	case err != nil:
		b.log.Warn("cannot start a spare shim; cells start without one", zap.Error(err))
	case !keep:
		s.discard() // Close came first
	}
}

// closeSpare ends the spare, and one being started, and starts no more.
func (b *Backend) closeSpare() {
	sp := &b.spares
	sp.mu.Lock()
	s := sp.s
	sp.s, sp.disabled = nil, true
	sp.mu.Unlock()
	if s != nil {
		s.discard()
	}
	sp.starting.Wait()
}

// A cell's shim (and a warm-pool sandbox's keeper) is recognised from the kernel's view of the
// process, never from a record in the bundle or its command line, which anyone can forge: it runs
// as the library's euid (real and effective), it leads a session of its own, its working
// directory is the bundle directory itself (device and inode: only the euid can enter a 0700
// directory of its own), and its executable is a file no other user can write (the library's
// binary, or an earlier build of it that a restarted supervisor replaced). The pid and start time
// found are then used through a pidfd, re-checked once it is open.

// isShimOf reports whether the running process id serves the bundle directory dir.
func isShimOf(id proc.Ident, dir *owned.Dir) bool {
	dev, ino := dir.Ident()
	return shimServes(id.Pid, proc.FileIdent{Dev: dev, Ino: ino}) && id.Alive()
}

// shimServes checks the kernel's view of pid against a shim serving the directory want.
func shimServes(pid int, want proc.FileIdent) bool {
	st, err := proc.ReadStat(pid)
	if err != nil || st.Session != pid || st.State == 'Z' || st.State == 'X' {
		return false
	}
	if real, eff, err := proc.Uids(pid); err != nil || real != os.Geteuid() || eff != os.Geteuid() {
		return false
	}
	cwd, err := proc.StatIdent("/proc/" + itoa(pid) + "/cwd")
	if err != nil || cwd != want {
		return false
	}
	return trustedExe(pid)
}

// trustedExe reports whether pid's executable is a file only root or the euid can change.
func trustedExe(pid int) bool {
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/"+itoa(pid)+"/exe", &st); err != nil {
		return false
	}
	return (st.Uid == 0 || int(st.Uid) == os.Geteuid()) && st.Mode&0o022 == 0
}

// findShim looks through /proc for the process serving the bundle directory dir.
func findShim(dir *owned.Dir) (proc.Ident, bool) {
	dev, ino := dir.Ident()
	shims := findShims()
	id, ok := shims[proc.FileIdent{Dev: dev, Ino: ino}]
	return id, ok
}

// findShims maps each directory a shim or keeper of the library serves to that process.
func findShims() map[proc.FileIdent]proc.Ident {
	out := map[proc.FileIdent]proc.Ident{}
	pids, err := proc.Pids()
	if err != nil {
		return out
	}
	euid := os.Geteuid()
	for _, pid := range pids {
		st, err := proc.ReadStat(pid)
		if err != nil || st.Session != pid {
			continue
		}
		if real, eff, err := proc.Uids(pid); err != nil || real != euid || eff != euid {
			continue
		}
		cwd, err := proc.StatIdent("/proc/" + itoa(pid) + "/cwd")
		if err != nil || !shimServes(pid, cwd) {
			continue
		}
		out[cwd] = proc.Ident{Pid: pid, Start: st.Start}
	}
	return out
}

// openShim returns a handle on the shim id when it still serves dir, or os.ErrProcessDone.
func openShim(id proc.Ident, dir *owned.Dir) (*proc.Handle, error) {
	if dir == nil {
		return nil, os.ErrProcessDone
	}
	h, err := id.Open()
	if err != nil {
		return nil, err
	}
	if !isShimOf(id, dir) {
		_ = h.Close()
		return nil, os.ErrProcessDone
	}
	return h, nil
}

func itoa(n int) string { return strconv.Itoa(n) }
