package gvisor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The keeper is the shim of a warm-pool sandbox (pool.go): the library's binary re-executed, as
// for a cell's shim, with its own argv0. It starts the idle sandbox (`runsc run --detach`) as a
// child subreaper, so that the sandbox's processes become its children: it reaps them when the
// sandbox is deleted, which keeps `runsc delete` fast (Debian's runsc waits for the sandbox
// process to be reaped, and this VM's PID 1 reaps orphans ~1.5 s late). Then it waits:
//
//   - "claim <bundle>" on fd 4: the supervisor has moved the pool directory to the cell's bundle
//     and written the cell's shim.json there. The keeper becomes the cell's shim: runShim runs
//     `runsc exec` of the workload into the sandbox, captures its output, enforces its TTL,
//     deletes the sandbox after the workload and writes exit.json — exactly what a cell's shim
//     does, so the cell survives its supervisor as any other.
//   - end of file on fd 4 (the supervisor closed it — Close — or died), SIGTERM (Recover), or the
//     sandbox dying: it deletes the sandbox and exits. The pool directory is the supervisor's (or
//     Recover's) to remove.
//
// fd 3 carries its replies: "ok" once the sandbox runs, and after a claim "ok" once runsc exec has
// started, or "error: <why>".
const keeperArgv0 = "cellos-gvisor-pool"

func init() {
	if len(os.Args) == 2 && os.Args[0] == keeperArgv0 && os.Getenv(shimEnv) == "1" {
		os.Exit(keeperMain(os.Args[1]))
	}
}

// keeperConfig is <pool dir>/keeper.json: how to start the idle sandbox.
type keeperConfig struct {
	RunscID string    `json:"runscId"`
	Runsc   runsc     `json:"runsc"`
	Flags   cellFlags `json:"flags"`
}

// Bounds of the keeper's own waits.
const (
	keeperStartTimeout = 60 * time.Second // runsc run --detach on a loaded host
	reapTimeout        = 5 * time.Second  // for the sandbox's processes once runsc delete returned
)

func keeperMain(dir string) int {
	signal.Ignore(syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGPIPE, syscall.SIGTTOU, syscall.SIGTTIN)
	terms := make(chan os.Signal, 1)
	signal.Notify(terms, syscall.SIGTERM)
	// The pipes must not leak into runsc and the sandbox it starts.
	syscall.CloseOnExec(3)
	syscall.CloseOnExec(4)
	replies, claims := os.NewFile(3, "replies"), os.NewFile(4, "claims")
	say := func(msg string) { _, _ = io.WriteString(replies, msg+"\n") }
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "cellos pool keeper: %v\n", err)
		say("error: " + err.Error())
		return 1
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fail(fmt.Errorf("becoming a child subreaper: %w", err))
	}
	var kc keeperConfig
	if err := readJSON(filepath.Join(dir, fileKeeper), &kc); err != nil {
		return fail(err)
	}
	if err := writePidFile(filepath.Join(dir, fileKeeperPid), os.Getpid()); err != nil {
		return fail(err)
	}
	if err := startIdleSandbox(dir, &kc); err != nil {
		releaseSandbox(&kc.Runsc, kc.RunscID)
		return fail(err)
	}
	say("ok")

	claimed := make(chan string, 1)
	go func() {
		line, err := bufio.NewReader(claims).ReadString('\n')
		if err != nil {
			line = ""
		}
		claimed <- line
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
	case line := <-claimed:
		bundle, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "claim ")
		if !ok || !filepath.IsAbs(bundle) {
			releaseSandbox(&kc.Runsc, kc.RunscID)
			return 0 // released: Close, or the supervisor is gone
		}
		signal.Reset(syscall.SIGTERM) // a cell's shim, from now on
		return keepCell(bundle, &kc, say, replies)
	case <-terms:
		fmt.Fprintln(os.Stderr, "cellos pool keeper: SIGTERM, deleting the idle sandbox")
	case <-died:
		fmt.Fprintln(os.Stderr, "cellos pool keeper: the idle sandbox died")
		releaseSandbox(&kc.Runsc, kc.RunscID)
		return 1
	}
	releaseSandbox(&kc.Runsc, kc.RunscID)
	return 0
}

// startIdleSandbox runs `runsc run --detach`: the sandbox and its gofer outlive that runsc and
// become the keeper's children. They inherit runsc's stdio, so none of it may be a pipe.
func startIdleSandbox(dir string, kc *keeperConfig) error {
	ctx, cancel := context.WithTimeout(context.Background(), keeperStartTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, kc.Runsc.Path, kc.Runsc.runDetachedArgs(kc.Flags, dir, kc.RunscID)...)
	cmd.Dir = dir
	cmd.Stderr = os.Stderr // shim.log, a file
	cmd.Env = shimChildEnv()
	if err := cmd.Run(); err != nil {
		if msg := runscFailure(kc.Flags.Log); msg != "" {
			return fmt.Errorf("starting the idle sandbox: %v: %s", err, msg)
		}
		return fmt.Errorf("starting the idle sandbox: %w", err)
	}
	return nil
}

// keepCell runs the cell the keeper's sandbox was claimed for, as its shim.
func keepCell(bundle string, kc *keeperConfig, say func(string), replies *os.File) int {
	rec, err := runShim(bundle, func() { say("ok"); _ = replies.Close() })
	if err != nil {
		fmt.Fprintf(os.Stderr, "cellos shim: %v\n", err)
		say("error: " + err.Error())
		releaseSandbox(&kc.Runsc, kc.RunscID)
		return 1
	}
	if err := writeJSONAtomic(filepath.Join(bundle, fileExit), rec); err != nil {
		fmt.Fprintf(os.Stderr, "cellos shim: recording the exit: %v\n", err)
		return 1
	}
	return 0
}

// releaseSandbox deletes the keeper's sandbox and reaps its processes. It runs in the keeper
// only, when no runsc command of its own is running: it reaps every child.
func releaseSandbox(r *runsc, id string) {
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
	r.removeStaleLocks(id)
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

// releasePooled is the end of a pooled cell's shim (runShim): once the workload's runsc exec
// has exited, the sandbox goes — with any process the workload left behind, which would
// otherwise hold its output open — before the output is drained, as `runsc run` ends a cold
// cell's sandbox with its workload.
func releasePooled(cfg *shimConfig) {
	releaseSandbox(&cfg.Runsc, cfg.RunscID)
}
