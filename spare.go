package gvisor

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// A spare shim is a shim started ahead of the next Create. Starting the shim is the one step the
// library adds to a cell's start-up path before runsc runs, and most of it is the Go runtime and
// package initialisation of the program the library is linked into (15–20 ms for a small binary
// on a 2-core VM, more for a large one). A spare has done that already: Create hands it the
// bundle through a pipe, and it starts runsc at once. From then on it is the cell's shim like any
// other (session of its own, exit.json, survives its supervisor).
//
// The next spare is started when a cell exits, or spareDelay after a Create, whichever comes
// first: starting it right after a Create would take CPU from that cell's sandbox while it boots
// (on 2 cores that cost a trivial cell ~5 % of its create -> exit time). A Create that finds no
// spare starts its shim itself.
//
// argv is [cellos-gvisor-shim --spare]; once it serves a cell its working directory is the
// bundle, which is how isShimOf recognises it. An unclaimed spare exits when its claim pipe
// closes: Close, or the supervisor's death.
const spareArg = "--spare"

// spareDelay is how long after a Create the next spare is started at the latest.
const spareDelay = time.Second

// spareShim is one spare: the process, the read end of its readiness pipe and the write end of
// its claim pipe.
type spareShim struct {
	cmd    *exec.Cmd
	ready  *os.File
	claims *os.File
}

// spares holds at most one spare shim.
type spares struct {
	mu       sync.Mutex
	s        *spareShim
	starting sync.WaitGroup // a spare being started, outside mu: Creates do not wait for it
	busy     bool           // one is being started
	disabled bool           // WithSpareShim(false), or after Close
}

// take returns the spare, if there is one that was started with the current environment.
func (sp *spares) take() *spareShim {
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

	s, err := startSpare()
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

func startSpare() (*spareShim, error) {
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	claimR, claimW, err := os.Pipe()
	if err != nil {
		_ = readyR.Close()
		_ = readyW.Close()
		return nil, err
	}
	cmd := selfCommand([]string{shimArgv0, spareArg}, "/", nil, readyW, claimR)
	err = cmd.Start()
	_ = readyW.Close()
	_ = claimR.Close()
	if err != nil {
		_ = readyR.Close()
		_ = claimW.Close()
		return nil, err
	}
	return &spareShim{cmd: cmd, ready: readyR, claims: claimW}, nil
}

// claim hands the spare a bundle. It fails when the spare is gone; the caller starts a shim.
func (s *spareShim) claim(bundle string) error {
	_, err := io.WriteString(s.claims, bundle+"\n")
	_ = s.claims.Close()
	if err != nil {
		_ = s.ready.Close()
		_ = s.cmd.Wait()
		return err
	}
	return nil
}

// discard ends an unclaimed spare: it exits when its claim pipe closes.
func (s *spareShim) discard() {
	_ = s.claims.Close()
	_ = s.ready.Close()
	done := make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(shimExitGrace):
		_ = s.cmd.Process.Kill()
		<-done
	}
}

// spareMain is a spare shim: it waits for a bundle on fd 4, then is that cell's shim.
func spareMain() int {
	ignoreSignals()
	syscall.CloseOnExec(3)
	syscall.CloseOnExec(4)
	claims := os.NewFile(4, "claims")
	line, err := bufio.NewReader(claims).ReadString('\n')
	_ = claims.Close()
	bundle := strings.TrimSuffix(line, "\n")
	if err != nil || !filepath.IsAbs(bundle) {
		return 0 // not needed: Close, or the supervisor is gone
	}
	logf, err := os.OpenFile(filepath.Join(bundle, fileShimLog), os.O_WRONLY|os.O_APPEND|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err == nil {
		err = unix.Dup3(int(logf.Fd()), 2, 0)
		_ = logf.Close()
	}
	if err == nil {
		err = os.Chdir(bundle)
	}
	if err != nil {
		ready := os.NewFile(3, "ready")
		_, _ = fmt.Fprintf(ready, "error: shim: %v\n", err)
		return 1
	}
	return shimMain(bundle)
}

// isSpareShimOf reports whether cmdline is a spare shim's and the process serves bundle.
func isSpareShimOf(pid int, cmdline []byte, bundle string) bool {
	if string(cmdline) != shimArgv0+"\x00"+spareArg+"\x00" {
		return false
	}
	cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	return err == nil && cwd == bundle
}
