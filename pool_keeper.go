package gvisor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/internal/owned"
)

// The keeper is the shim of a warm-pool sandbox (pool.go): the library's binary re-executed, as
// for a cell's shim, with its own argv0 and the same two pipes. Its first request (keeperRequest)
// names the pool directory and how to start the idle sandbox; it starts it (`runsc run --detach`)
// as a child subreaper, so that the sandbox's processes become its children: it reaps them when
// the sandbox is deleted, which keeps `runsc delete` fast (Debian's runsc waits for the sandbox
// process to be reaped, and this VM's PID 1 reaps orphans ~1.5 s late). Then it waits:
//
//   - a second request, a cell's shimRequest: the supervisor has moved the pool directory to the
//     cell's bundle (the same directory: the keeper checks its device and inode) and written the
//     cell's files there. The keeper becomes the cell's shim: runShim runs `runsc exec` of the
//     workload into the sandbox, captures its output, enforces its TTL, deletes the sandbox
//     after the workload and writes exit.json — exactly what a cell's shim does, so the cell
//     survives its supervisor as any other.
//   - end of file on fd 4 (the supervisor closed it — Close — or died), SIGTERM (Recover), or the
//     sandbox dying: it deletes the sandbox and exits. The pool directory is the supervisor's (or
//     Recover's) to remove.
//
// fd 3 carries its answers: "ok" once the sandbox runs, and after a claim "ok" once runsc exec
// has started, or "error: <why>".
const keeperArgv0 = "cellos-gvisor-pool"

// keeperRequest is the supervisor's first request to a keeper: start the idle sandbox of the
// pool directory Dir (identified by device and inode).
type keeperRequest struct {
	Protocol int             `json:"protocol"`
	Dir      string          `json:"dir"`
	Dev      uint64          `json:"dev"`
	Ino      uint64          `json:"ino"`
	RunscID  string          `json:"runscId"`
	Runsc    runsc.Runsc     `json:"runsc"`
	Flags    runsc.CellFlags `json:"flags"`
}

// Bounds of the keeper's own waits.
const (
	keeperStartTimeout = 60 * time.Second // runsc run --detach on a loaded host
	reapTimeout        = 5 * time.Second  // for the sandbox's processes once runsc delete returned
)

func keeperMain() int {
	ignoreSignals()
	terms := make(chan os.Signal, 1)
	signal.Notify(terms, syscall.SIGTERM)
	answers, requests := shimPipes()
	say := func(msg string) { _, _ = io.WriteString(answers, msg+"\n") }
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "cellos pool keeper: %v\n", err)
		say("error: " + strings.ReplaceAll(err.Error(), "\n", " "))
		return 1
	}
	rd := bufio.NewReader(requests)
	var kr keeperRequest
	if err := readRequest(rd, &kr); err != nil {
		if errors.Is(err, io.EOF) {
			return 0
		}
		return fail(err)
	}
	if kr.Protocol != shimProtocol || !runsc.IsPoolID(kr.RunscID) || !filepath.IsAbs(kr.Runsc.Path) {
		return fail(fmt.Errorf("malformed request (protocol %d, sandbox %q)", kr.Protocol, kr.RunscID))
	}
	dir, err := owned.OpenIdent(kr.Dir, kr.Dev, kr.Ino)
	if err != nil {
		return fail(fmt.Errorf("opening the pool directory: %w", err))
	}
	if err := enterBundle(dir); err != nil {
		return fail(err)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fail(fmt.Errorf("becoming a child subreaper: %w", err))
	}
	if err := startIdleSandbox(dir, &kr); err != nil {
		releaseSandbox(&kr.Runsc, kr.RunscID)
		return fail(err)
	}
	say("ok")

	claimed := make(chan *shimRequest, 1)
	go func() {
		var req shimRequest
		if err := readRequest(rd, &req); err != nil {
			if !errors.Is(err, io.EOF) {
				fmt.Fprintf(os.Stderr, "cellos pool keeper: %v\n", err)
			}
			claimed <- nil
			return
		}
		claimed <- &req
	}()
	died := make(chan struct{}, 1)
	go func() {
		// Peek, do not reap: once claimed, the children are runShim's to wait for.
		var info unix.Siginfo
		for {
			err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOWAIT, nil)
			if !errors.Is(err, unix.EINTR) {
				break
			}
		}
		died <- struct{}{}
	}()

	select {
	case req := <-claimed:
		if req == nil {
			releaseSandbox(&kr.Runsc, kr.RunscID)
			return 0 // released: Close, or the supervisor is gone
		}
		signal.Reset(syscall.SIGTERM) // a cell's shim, from now on
		return keepCell(dir, &kr, req, &answerer{f: answers})
	case <-terms:
		fmt.Fprintln(os.Stderr, "cellos pool keeper: SIGTERM, deleting the idle sandbox")
	case <-died:
		fmt.Fprintln(os.Stderr, "cellos pool keeper: the idle sandbox died")
		releaseSandbox(&kr.Runsc, kr.RunscID)
		return 1
	}
	releaseSandbox(&kr.Runsc, kr.RunscID)
	return 0
}

// startIdleSandbox runs `runsc run --detach`: the sandbox and its gofer outlive that runsc and
// become the keeper's children. They inherit runsc's stdio, so none of it may be a pipe.
func startIdleSandbox(dir *owned.Dir, kr *keeperRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), keeperStartTimeout)
	defer cancel()
	cmd := kr.Runsc.Command(ctx, kr.Runsc.RunDetachedArgs(kr.Flags, dir.Path(), kr.RunscID)...)
	cmd.Dir = dir.Path()
	cmd.Stderr = os.Stderr // shim.log, a file
	cmd.Env = shimChildEnv()
	err := kr.Runsc.Start(cmd)
	if err == nil {
		err = cmd.Wait()
	}
	if err != nil {
		if msg := runscFailure(dir, bundle.SandboxLog); msg != "" {
			return fmt.Errorf("starting the idle sandbox: %v: %s", err, msg)
		}
		return fmt.Errorf("starting the idle sandbox: %w", err)
	}
	return nil
}

// keepCell runs the cell the keeper's sandbox was claimed for, as its shim. The bundle must be
// the keeper's own directory, moved.
func keepCell(dir *owned.Dir, kr *keeperRequest, req *shimRequest, a *answerer) int {
	err := req.check()
	if err == nil && (req.Dev != kr.Dev || req.Ino != kr.Ino || req.Config.RunscID != kr.RunscID || !req.Config.Pool) {
		err = fmt.Errorf("the claim names another directory or sandbox (%s, %s)", req.Bundle, req.Config.RunscID)
	}
	var moved *owned.Dir
	if err == nil {
		moved, err = owned.OpenIdent(req.Bundle, kr.Dev, kr.Ino)
	}
	if err != nil {
		releaseSandbox(&kr.Runsc, kr.RunscID)
		return a.fail(err)
	}
	_ = dir.Close()
	code := serve(moved, &req.Config, a)
	if code != 0 {
		releaseSandbox(&kr.Runsc, kr.RunscID) // nothing was started for the cell, or it has ended
	}
	return code
}

// releaseSandbox deletes the keeper's sandbox and reaps its processes. It runs in the keeper
// only, when no runsc command of its own is running: it reaps every child.
func releaseSandbox(r *runsc.Runsc, id string) {
	// The sandbox and gofer are reaped as they die: runsc delete waits for that.
	kids := childPids()
	reaped := make(chan struct{}, len(kids))
	for _, pid := range kids {
		go func() {
			var ws unix.WaitStatus
			for {
				_, err := unix.Wait4(pid, &ws, 0, nil)
				if !errors.Is(err, unix.EINTR) {
					break
				}
			}
			reaped <- struct{}{}
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), runscTimeout)
	err := r.Delete(ctx, id)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "cellos pool keeper: runsc delete: %v\n", err)
	}
	deadline := time.After(reapTimeout)
wait:
	for range kids {
		select {
		case <-reaped:
		case <-deadline:
			fmt.Fprintln(os.Stderr, "cellos pool keeper: the sandbox's processes did not exit")
			break wait
		}
	}
	// Stragglers (ptrace stubs reparented when the sandbox died).
	for end := time.Now().Add(time.Second); time.Now().Before(end); {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.ECHILD) {
			break
		}
		if pid <= 0 {
			time.Sleep(10 * time.Millisecond)
		}
	}
	r.RemoveStaleLocks(id)
}

// childPids lists the calling process's children (of every thread).
func childPids() []int {
	var out []int
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	for _, t := range tasks {
		data, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(f); err == nil {
				out = append(out, pid)
			}
		}
	}
	return out
}
