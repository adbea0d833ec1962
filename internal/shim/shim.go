// Package shim owns the processes the library runs outside the supervisor, re-executed from its
// own binary: a cell's shim (which waits on runsc for the cell, captures its output, enforces its
// lifetime and records its exit) and a warm-pool sandbox's keeper (which starts an idle sandbox
// and becomes the shim of the cell that claims it); their protocol with the supervisor (one
// request over a pipe, versioned; one answer); the records they write in a bundle (exit.json);
// and, on the supervisor's side, starting them, keeping a spare one, and recognising them later
// from /proc.
package shim

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/bundle"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
	"github.com/cellos/cellos-host-gvisor/internal/proc"
	"github.com/cellos/cellos-host-gvisor/internal/runsc"
	"golang.org/x/sys/unix"
)

// The shim is the small process that waits on `runsc run` for one cell. The library starts it by
// re-executing its own binary (/proc/self/exe) with the argv0 and environment below; this
// package's init function recognises them and runs shimMain instead of the program. Because the
// shim, not the supervisor, holds runsc's stdout and stderr and waits on it, a cell keeps its
// output and its exit status when the supervisor crashes, is upgraded or restarted: the shim
// records the exit in the bundle (exit.json) and a new Backend adopts it (Recover).
//
// The shim runs in a session of its own, so signals to the supervisor's process group (a Ctrl-C
// in a terminal) do not reach it or runsc.
//
// Its protocol with the supervisor is two pipes, never a file: fd 4 carries one request (a JSON
// line, Request: the bundle, identified by path, device and inode, and everything the shim
// needs, runsc's command line included), fd 3 one answer ("ok" once runsc runs, or "error: ...").
// Nothing the shim acts on is read back from the bundle, which it opens as an owned directory
// and checks to be the one the supervisor made. A shim is started before it is needed (spare.go):
// it waits on fd 4 and exits when that pipe closes without a request.
const (
	Argv0      = "cellos-gvisor-shim"
	Env        = "CELLOS_GVISOR_SHIM"
	Protocol   = 1
	maxRequest = 1 << 20
)

// Request is the supervisor's request to a shim: serve the cell whose bundle this is.
type Request struct {
	Protocol int    `json:"protocol"`
	Bundle   string `json:"bundle"`
	Dev      uint64 `json:"dev"` // the bundle directory's device and inode, as the supervisor made it
	Ino      uint64 `json:"ino"`
	Config   Config `json:"config"`
}

// Config is what the shim does for its cell. A copy is left in the bundle (shim.json) for
// operators; the library never reads it.
type Config struct {
	CellID       string          `json:"cellId"`
	RunscID      string          `json:"runscId"`
	Runsc        runsc.Runsc     `json:"runsc"`
	Flags        runsc.CellFlags `json:"flags"`
	TTLSeconds   int64           `json:"ttlSeconds,omitempty"`
	OutputCap    int64           `json:"outputCap"`
	MemoryCgroup string          `json:"memoryCgroup,omitempty"` // read for OOM kills after the exit
	RestoreImage string          `json:"restoreImage,omitempty"` // restore from this checkpoint instead of running config.json's process
	Pool         bool            `json:"pool,omitempty"`         // the cell runs in a warm-pool sandbox: runsc exec of its process (pool.go)
}

// check refuses a request the shim cannot trust to be well formed.
func (r *Request) Check() error {
	switch {
	case r.Protocol != Protocol:
		return fmt.Errorf("protocol %d, this shim speaks %d", r.Protocol, Protocol)
	case !filepath.IsAbs(r.Bundle) || filepath.Clean(r.Bundle) != r.Bundle:
		return fmt.Errorf("bundle %q is not an absolute, clean path", r.Bundle)
	case !filepath.IsAbs(r.Config.Runsc.Path) || r.Config.RunscID == "" || r.Config.OutputCap <= 0:
		return errors.New("incomplete configuration")
	}
	return nil
}

// readRequest reads one JSON line of at most maxRequest bytes from r: io.EOF when the pipe
// closed without one.
func readRequest(r *bufio.Reader, v any) error {
	var line []byte
	for {
		frag, err := r.ReadSlice('\n')
		line = append(line, frag...)
		if len(line) > maxRequest {
			return fmt.Errorf("request longer than %d bytes", maxRequest)
		}
		if err == nil {
			break
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if len(line) == 0 {
			return io.EOF
		}
		return fmt.Errorf("reading the request: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("malformed request: %w", err)
	}
	return nil
}

// sendRequest writes v to w as one JSON line.
func sendRequest(w io.Writer, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(data, '\n'))
	return err
}

// ExitRecord is <bundle>/exit.json: how the cell ended, written once by the shim.
type ExitRecord struct {
	Status    cellos.ExitStatus `json:"status"`
	Error     string            `json:"error,omitempty"` // runsc's own failure; Status is meaningless then
	Runsc     string            `json:"runsc"`           // how the runsc process ended: "exit 7", "signal 9"
	StartedAt time.Time         `json:"startedAt"`
	ExitedAt  time.Time         `json:"exitedAt"`
	Stdout    StreamRecord      `json:"stdout"`
	Stderr    StreamRecord      `json:"stderr"`

	// Checkpoint is the image directory when Checkpoint stopped the cell; Status is meaningless then.
	Checkpoint string `json:"checkpoint,omitempty"`
}

type StreamRecord struct {
	Bytes     int64  `json:"bytes"`               // captured to the file
	Dropped   int64  `json:"dropped,omitempty"`   // discarded beyond the cap
	Truncated bool   `json:"truncated,omitempty"` // the cap was reached
	Error     string `json:"error,omitempty"`     // writing the file failed (disk full)
}

// Bounds of what the library reads back of a bundle's records and logs.
const (
	maxLogRead  = 1 << 20
	maxErrorMsg = 4 << 10 // of runsc's messages kept in the exit record
)

// ignoreSignals makes the shim deaf to the signals of a terminal and of a closed pipe.
func ignoreSignals() {
	signal.Ignore(syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGPIPE, syscall.SIGTTOU, syscall.SIGTTIN)
}

// shimPipes are the shim's and the keeper's fd 3 (answers) and fd 4 (requests).
func shimPipes() (answers, requests *os.File) {
	syscall.CloseOnExec(3) // not runsc's
	syscall.CloseOnExec(4)
	return os.NewFile(3, "answers"), os.NewFile(4, "requests")
}

// answerer writes the shim's one answer on fd 3.
type answerer struct{ f *os.File }

func (a *answerer) say(msg string) {
	if a.f != nil {
		_, _ = io.WriteString(a.f, msg+"\n")
		_ = a.f.Close()
		a.f = nil
	}
}

func (a *answerer) fail(err error) int {
	fmt.Fprintf(os.Stderr, "cellos shim: %v\n", err)
	a.say("error: " + strings.ReplaceAll(err.Error(), "\n", " "))
	return 1
}

// Bounds of the shim's and the supervisor's waits on these processes.
const (
	runscTimeout  = 15 * time.Second // a runsc management command
	shimExitGrace = 10 * time.Second // a shim or keeper that was told to go
)

// CheckpointImage is the file runsc writes into a checkpoint's image directory.
const CheckpointImage = "checkpoint.img"

// Main runs the shim or the keeper when this process is one (its argv0 and environment say so),
// and exits with its exit code; it returns at once in any other process. The library calls it
// from its package's init function.
func Main() {
	if len(os.Args) == 1 && os.Getenv(Env) == "1" {
		switch os.Args[0] {
		case Argv0:
			os.Exit(shimMain())
		case KeeperArgv0:
			os.Exit(keeperMain())
		}
	}
}

// shimMain runs in the shim process: it waits for its request, then serves that cell.
func shimMain() int {
	ignoreSignals()
	answers, requests := shimPipes()
	a := &answerer{f: answers}
	var req Request
	err := readRequest(bufio.NewReader(requests), &req)
	_ = requests.Close()
	if errors.Is(err, io.EOF) {
		return 0 // not needed: Close, or the supervisor is gone
	}
	if err == nil {
		err = req.Check()
	}
	if err != nil {
		return a.fail(err)
	}
	dir, err := owned.OpenIdent(req.Bundle, req.Dev, req.Ino)
	if err != nil {
		return a.fail(fmt.Errorf("opening the bundle: %w", err))
	}
	if err := enterBundle(dir); err != nil {
		return a.fail(err)
	}
	return serve(dir, &req.Config, a)
}

// enterBundle makes the bundle the shim's working directory — which is how the library
// recognises a cell's shim — and its log the shim's stderr.
func enterBundle(dir *owned.Dir) error {
	logf, err := dir.OpenFile(bundle.ShimLog, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("shim log: %w", err)
	}
	err = unix.Dup3(int(logf.Fd()), 2, 0)
	_ = logf.Close()
	if err != nil {
		return fmt.Errorf("shim log: %w", err)
	}
	if err := unix.Fchdir(dir.Fd()); err != nil {
		return fmt.Errorf("entering the bundle: %w", err)
	}
	return nil
}

// serve runs the cell and records its exit.
func serve(dir *owned.Dir, cfg *Config, a *answerer) int {
	reserve, err := dir.OpenFile(bundle.ExitReserve, os.O_RDWR, 0)
	if err != nil {
		return a.fail(fmt.Errorf("the exit record's reserved space: %w", err))
	}
	defer reserve.Close()
	rec, err := runShim(dir, cfg, func() { a.say("ok") })
	if err != nil {
		return a.fail(err)
	}
	if err := writeExit(dir, reserve, rec); err != nil {
		fmt.Fprintf(os.Stderr, "cellos shim: recording the exit: %v\n", err)
		return 1
	}
	return 0
}

// writeExit writes the exit record into the space reserved for it at Create, then renames it
// into place: on a full filesystem the record needs no new blocks (on filesystems that overwrite
// in place), and a reader sees the whole record or none.
func writeExit(dir *owned.Dir, reserve *os.File, rec *ExitRecord) error {
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	data = append(data, '\n')
	if len(data) > bundle.ExitReserveSize {
		return dir.WriteAtomic(bundle.Exit, data, 0o644)
	}
	if _, err := reserve.WriteAt(data, 0); err != nil {
		return err
	}
	if err := reserve.Truncate(int64(len(data))); err != nil {
		return err
	}
	return dir.Rename(bundle.ExitReserve, dir, bundle.Exit)
}

func runShim(dir *owned.Dir, cfg *Config, started func()) (*ExitRecord, error) {
	bpath := dir.Path()
	outFile, err := dir.OpenFile(bundle.Stdout, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return nil, err
	}
	defer outFile.Close()
	errFile, err := dir.OpenFile(bundle.Stderr, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return nil, err
	}
	defer errFile.Close()
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	self, err := proc.IdentOf(os.Getpid())
	if err != nil {
		return nil, err
	}
	if err := bundle.WriteRecord(dir, bundle.ShimPid, self); err != nil { // for operators; the library finds shims in /proc
		return nil, err
	}

	cmd := cfg.Runsc.Command(context.Background(), cfg.runscArgs(bpath)...)
	cmd.Dir = bpath
	cmd.Stdout, cmd.Stderr = outW, errW
	cmd.Env = ChildEnv()
	cmd.WaitDelay = 0
	rec := &ExitRecord{StartedAt: time.Now().UTC()}
	if err := cfg.Runsc.Start(cmd); err != nil {
		return nil, fmt.Errorf("starting runsc: %w", err)
	}
	_ = outW.Close()
	_ = errW.Close()
	started()

	outDone := make(chan StreamRecord, 1)
	errDone := make(chan StreamRecord, 1)
	go func() { outDone <- capture(outR, outFile, cfg.OutputCap, "stdout") }()
	go func() { errDone <- capture(errR, errFile, cfg.OutputCap, "stderr") }()

	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()

	deadlineHit := false
	if cfg.TTLSeconds > 0 {
		timer := time.NewTimer(time.Duration(cfg.TTLSeconds)*time.Second - time.Since(rec.StartedAt))
		select {
		case <-exited:
			timer.Stop()
		case <-timer.C:
			deadlineHit = true
			killExpired(cfg, dir, cmd, exited)
		}
	}
	<-exited
	rec.ExitedAt = time.Now().UTC()
	if cfg.Pool {
		ReleaseSandbox(&cfg.Runsc, cfg.RunscID) // the pool sandbox goes with its workload, as a cold cell's with runsc run
	}

	// The sandbox's processes hold the pipes too; they are gone or going once runsc has
	// exited. Do not let a straggler hold the record back.
	drain := time.AfterFunc(3*time.Second, func() { _ = outR.Close(); _ = errR.Close() })
	rec.Stdout, rec.Stderr = <-outDone, <-errDone
	drain.Stop()
	_ = outR.Close()
	_ = errR.Close()

	interpret(rec, cfg, dir, cmd.ProcessState, waitErr, deadlineHit)
	return rec, nil
}

// runscArgs is the argv (without the binary) of the runsc process the shim waits on: `run`,
// `restore` for a cell restored from a checkpoint, or `exec` of the workload for a cell in a
// warm-pool sandbox.
func (cfg *Config) runscArgs(bpath string) []string {
	switch {
	case cfg.RestoreImage != "":
		return cfg.Runsc.RestoreArgs(cfg.Flags, bpath, cfg.RunscID, cfg.RestoreImage)
	case cfg.Pool:
		return cfg.Runsc.ExecArgs(cfg.Flags, cfg.RunscID, filepath.Join(bpath, bundle.Process), filepath.Join(bpath, bundle.WorkloadPid))
	}
	return cfg.Runsc.RunArgs(cfg.Flags, bpath, cfg.RunscID)
}

// killExpired ends a cell whose lifetime is over: SIGKILL through runsc, then, if runsc run has
// not exited after a grace period, SIGKILL to runsc itself and a forced delete.
func killExpired(cfg *Config, dir *owned.Dir, cmd *exec.Cmd, exited <-chan struct{}) {
	ResumePaused(&cfg.Runsc, cfg.RunscID, dir) // a paused sandbox does not take SIGKILL
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	err := cfg.Runsc.Kill(ctx, cfg.RunscID, "KILL")
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "cellos shim: lifetime over, runsc kill: %v\n", err)
	}
	select {
	case <-exited:
		return
	case <-time.After(5 * time.Second):
	}
	_ = cmd.Process.Kill()
	<-exited
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := cfg.Runsc.Delete(ctx, cfg.RunscID); err != nil {
		fmt.Fprintf(os.Stderr, "cellos shim: lifetime over, runsc delete: %v\n", err)
	}
}

// interpret turns how runsc ended into the cell's exit status. runsc exits with the workload's
// code, 128+N for a workload killed by signal N, and 128 for its own failures, which only its log
// tells apart.
func interpret(rec *ExitRecord, cfg *Config, dir *owned.Dir, ps *os.ProcessState, waitErr error, deadline bool) {
	if ps == nil {
		rec.Runsc = "unknown"
		rec.Error = fmt.Sprintf("waiting for runsc: %v", waitErr)
		return
	}
	ws, _ := ps.Sys().(syscall.WaitStatus)
	switch {
	case ws.Signaled():
		rec.Runsc = "signal " + strconv.Itoa(int(ws.Signal()))
	default:
		rec.Runsc = "exit " + strconv.Itoa(ws.ExitStatus())
	}
	if deadline {
		rec.Status = cellos.ExitStatus{Code: 128 + int(syscall.SIGKILL), Signal: int(syscall.SIGKILL), Reason: cellos.ExitDeadlineExceeded}
		return
	}
	if ws.Signaled() {
		rec.Error = fmt.Sprintf("runsc was killed by signal %d (%s) before the cell exited", int(ws.Signal()), ws.Signal())
		return
	}
	code := ws.ExitStatus()
	if code == 0 {
		// runsc run exits 0 when its container is checkpointed: that is not the workload's exit.
		// A workload that exited 0 while a checkpoint was being taken left no image: its exit
		// stands.
		if image := checkpointedTo(dir); image != "" && CheckpointWritten(image) {
			rec.Checkpoint = image
			return
		}
	}
	if code == 128 {
		if msg := RunscFailure(dir, bundle.RunscLog); msg != "" {
			rec.Error = runsc.Clip(msg, maxErrorMsg)
			return
		}
	}
	rec.Status = Classify(code)
	if rec.Status.Reason == cellos.ExitSignaled && cfg.MemoryCgroup != "" {
		if n, err := cgroups.OOMKills(cfg.MemoryCgroup); err == nil && n > 0 {
			rec.Status.Reason = cellos.ExitOOMKilled
		}
	}
}

// Classify maps a runsc exit code to a status. Codes 129..192 are reported as deaths by signal
// code-128: runsc reports a workload killed by signal N and one that called exit(128+N) alike,
// so this is an inference.
func Classify(code int) cellos.ExitStatus {
	if code > 128 && code <= 128+64 {
		return cellos.ExitStatus{Code: code, Signal: code - 128, Reason: cellos.ExitSignaled}
	}
	return cellos.ExitStatus{Code: code, Reason: cellos.ExitExited}
}

// RunscFailure returns the error-level messages of runsc's JSON log name in dir, or "".
func RunscFailure(dir *owned.Dir, name string) string {
	f, err := dir.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		return ""
	}
	defer f.Close()
	return runscLogErrors(f)
}

// runscLogErrors returns the error-level messages of a runsc JSON log.
func runscLogErrors(r io.Reader) string {
	var msgs []string
	sc := bufio.NewScanner(io.LimitReader(r, maxLogRead))
	sc.Buffer(make([]byte, 64<<10), maxLogRead)
	for sc.Scan() {
		var line struct {
			Msg   string `json:"msg"`
			Level string `json:"level"`
		}
		if json.Unmarshal(sc.Bytes(), &line) == nil && (line.Level == "error" || line.Level == "fatal") && line.Msg != "" {
			msgs = append(msgs, line.Msg)
		}
	}
	return strings.Join(msgs, "; ")
}

// capture copies one of runsc's streams to its file, at most limit bytes; beyond that it keeps
// reading, so the workload never blocks, and discards. Reaching the cap is marked in the file.
func capture(r io.Reader, w io.Writer, limit int64, name string) StreamRecord {
	var rec StreamRecord
	buf := make([]byte, 64<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			keep := int64(n)
			if room := limit - rec.Bytes; keep > room {
				keep = max(room, 0)
			}
			if keep > 0 && rec.Error == "" {
				if _, werr := w.Write(buf[:keep]); werr != nil {
					rec.Error = werr.Error()
				}
			}
			rec.Bytes += keep
			rec.Dropped += int64(n) - keep
			if keep < int64(n) && !rec.Truncated {
				rec.Truncated = true
				fmt.Fprintf(os.Stderr, "cellos shim: %s reached its cap of %d bytes; the rest is discarded\n", name, limit)
				if rec.Error == "" {
					_, _ = fmt.Fprintf(w, "\n[cellos: %s truncated at %d bytes]\n", name, limit)
				}
			}
		}
		if err != nil {
			return rec
		}
	}
}

// ChildEnv is the shim's environment for runsc, without the shim's own marker.
func ChildEnv() []string {
	env := os.Environ()
	out := env[:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, Env+"=") && !strings.HasPrefix(kv, "GORACE=") {
			out = append(out, kv)
		}
	}
	return out
}

// The keeper is the shim of a warm-pool sandbox (pool.go): the library's binary re-executed, as
// for a cell's shim, with its own argv0 and the same two pipes. Its first request (KeeperRequest)
// names the pool directory and how to start the idle sandbox; it starts it (`runsc run --detach`)
// as a child subreaper, so that the sandbox's processes become its children: it reaps them when
// the sandbox is deleted, which keeps `runsc delete` fast (Debian's runsc waits for the sandbox
// process to be reaped, and this VM's PID 1 reaps orphans ~1.5 s late). Then it waits:
//
//   - a second request, a cell's Request: the supervisor has moved the pool directory to the
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
const KeeperArgv0 = "cellos-gvisor-pool"

// KeeperRequest is the supervisor's first request to a keeper: start the idle sandbox of the
// pool directory Dir (identified by device and inode).
type KeeperRequest struct {
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
	var kr KeeperRequest
	if err := readRequest(rd, &kr); err != nil {
		if errors.Is(err, io.EOF) {
			return 0
		}
		return fail(err)
	}
	if kr.Protocol != Protocol || !runsc.IsPoolID(kr.RunscID) || !filepath.IsAbs(kr.Runsc.Path) {
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
		ReleaseSandbox(&kr.Runsc, kr.RunscID)
		return fail(err)
	}
	say("ok")

	claimed := make(chan *Request, 1)
	go func() {
		var req Request
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
			ReleaseSandbox(&kr.Runsc, kr.RunscID)
			return 0 // released: Close, or the supervisor is gone
		}
		signal.Reset(syscall.SIGTERM) // a cell's shim, from now on
		return keepCell(dir, &kr, req, &answerer{f: answers})
	case <-terms:
		fmt.Fprintln(os.Stderr, "cellos pool keeper: SIGTERM, deleting the idle sandbox")
	case <-died:
		fmt.Fprintln(os.Stderr, "cellos pool keeper: the idle sandbox died")
		ReleaseSandbox(&kr.Runsc, kr.RunscID)
		return 1
	}
	ReleaseSandbox(&kr.Runsc, kr.RunscID)
	return 0
}

// startIdleSandbox runs `runsc run --detach`: the sandbox and its gofer outlive that runsc and
// become the keeper's children. They inherit runsc's stdio, so none of it may be a pipe.
func startIdleSandbox(dir *owned.Dir, kr *KeeperRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), keeperStartTimeout)
	defer cancel()
	cmd := kr.Runsc.Command(ctx, kr.Runsc.RunDetachedArgs(kr.Flags, dir.Path(), kr.RunscID)...)
	cmd.Dir = dir.Path()
	cmd.Stderr = os.Stderr // shim.log, a file
	cmd.Env = ChildEnv()
	err := kr.Runsc.Start(cmd)
	if err == nil {
		err = cmd.Wait()
	}
	if err != nil {
		if msg := RunscFailure(dir, bundle.SandboxLog); msg != "" {
			return fmt.Errorf("starting the idle sandbox: %v: %s", err, msg)
		}
		return fmt.Errorf("starting the idle sandbox: %w", err)
	}
	return nil
}

// keepCell runs the cell the keeper's sandbox was claimed for, as its shim. The bundle must be
// the keeper's own directory, moved.
func keepCell(dir *owned.Dir, kr *KeeperRequest, req *Request, a *answerer) int {
	err := req.Check()
	if err == nil && (req.Dev != kr.Dev || req.Ino != kr.Ino || req.Config.RunscID != kr.RunscID || !req.Config.Pool) {
		err = fmt.Errorf("the claim names another directory or sandbox (%s, %s)", req.Bundle, req.Config.RunscID)
	}
	var moved *owned.Dir
	if err == nil {
		moved, err = owned.OpenIdent(req.Bundle, kr.Dev, kr.Ino)
	}
	if err != nil {
		ReleaseSandbox(&kr.Runsc, kr.RunscID)
		return a.fail(err)
	}
	_ = dir.Close()
	code := serve(moved, &req.Config, a)
	if code != 0 {
		ReleaseSandbox(&kr.Runsc, kr.RunscID) // nothing was started for the cell, or it has ended
	}
	return code
}

// ReleaseSandbox deletes the keeper's sandbox and reaps its processes. It runs in the keeper
// only, when no runsc command of its own is running: it reaps every child.
func ReleaseSandbox(r *runsc.Runsc, id string) {
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

// Proc is a started shim or keeper: the process, its identity, the read end of its answer
// pipe (its fd 3) and the write end of its request pipe (its fd 4).
type Proc struct {
	Cmd      *exec.Cmd
	Ident    proc.Ident
	Answers  *os.File      // the read end of its fd 3
	Requests *os.File      // the write end of its fd 4
	Exited   chan struct{} // closed once the process has exited and been reaped
	rd       *bufio.Reader
}

// Start starts this binary as argv0 (a shim or a keeper): in a session of its own, with
// the shim environment, in /, with its output to /dev/null until it takes its bundle's log.
func Start(argv0 string) (*Proc, error) {
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
		Env:         Environ(),
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
	s := &Proc{Cmd: cmd, Answers: answersR, rd: bufio.NewReader(answersR), Requests: requestsW, Exited: exited}
	if s.Ident, err = proc.IdentOf(cmd.Process.Pid); err != nil {
		s.Discard()
		return nil, err
	}
	return s, nil
}

// Wait blocks until the process has exited, within d; false when it has not.
func (s *Proc) Wait(d time.Duration) bool {
	select {
	case <-s.Exited:
		return true
	case <-time.After(d):
		return false
	}
}

// ErrNoAnswer: the process closed its answer pipe (it exited) without answering.
var ErrNoAnswer = errors.New("exited without an answer")

// Answer reads the process's next answer line, within ctx and timeout (0: ctx alone).
func (s *Proc) Answer(ctx context.Context, timeout time.Duration) (string, error) {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	f := s.Answers
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		return "", err
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = f.SetReadDeadline(time.Unix(1, 0))
		close(fired)
	})
	line, err := s.rd.ReadString('\n')
	if !stop() {
		<-fired
	}
	if err != nil {
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		if errors.Is(err, io.EOF) {
			return "", ErrNoAnswer
		}
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// Send writes one request. It fails when the process is gone (its end of the pipe closed).
func (s *Proc) Send(v any) error { return sendRequest(s.Requests, v) }

// Discard ends a shim that serves no cell: it exits when its request pipe closes.
func (s *Proc) Discard() {
	_ = s.Requests.Close()
	_ = s.Answers.Close()
	if !s.Wait(shimExitGrace) {
		_ = s.Cmd.Process.Kill() // through its pidfd: never another process
		<-s.Exited
	}
}

// Environ is the shim's environment: the program's, with the shim marker. A binary built with
// -race (tests) would otherwise sleep a second before exiting; the setting is inert otherwise.
func Environ() []string {
	env := ChildEnv()
	race := "atexit_sleep_ms=0"
	if v := os.Getenv("GORACE"); v != "" {
		race = v + " " + race
	}
	return append(env, "GORACE="+race, Env+"=1")
}

// Spares holds at most one spare shim.
type Spares struct {
	mu       sync.Mutex
	s        *Proc
	starting sync.WaitGroup // a spare being started, outside mu: Creates do not wait for it
	busy     bool           // one is being started
	disabled bool           // WithSpareShim(false), or after Close
}

// NewSpares keeps a spare shim, or none when disabled.
func NewSpares(disabled bool) *Spares { return &Spares{disabled: disabled} }

// Refill starts a spare when there is none (and none is being started).
func (sp *Spares) Refill() error {
	sp.mu.Lock()
	if sp.disabled || sp.s != nil || sp.busy {
		sp.mu.Unlock()
		return nil
	}
	sp.busy = true
	sp.starting.Add(1)
	sp.mu.Unlock()
	defer sp.starting.Done()

	s, err := Start(Argv0)
	sp.mu.Lock()
	sp.busy = false
	keep := err == nil && !sp.disabled && sp.s == nil
	if keep {
		sp.s = s
	}
	sp.mu.Unlock()
	if err == nil && !keep {
		s.Discard() // Close came first
	}
	return err
}

// Close ends the spare, and one being started, and starts no more.
func (sp *Spares) Close() {
	sp.mu.Lock()
	s := sp.s
	sp.s, sp.disabled = nil, true
	sp.mu.Unlock()
	if s != nil {
		s.Discard()
	}
	sp.starting.Wait()
}

// Take returns the spare, if there is one that was started with the current environment.
func (sp *Spares) Take() *Proc {
	sp.mu.Lock()
	s := sp.s
	sp.s = nil
	sp.mu.Unlock()
	if s != nil && !slices.Equal(s.Cmd.Env, Environ()) { // started with another environment
		s.Discard()
		return nil
	}
	return s
}

// A cell's shim (and a warm-pool sandbox's keeper) is recognised from the kernel's view of the
// process, never from a record in the bundle or its command line, which anyone can forge: it runs
// as the library's euid (real and effective), it leads a session of its own, its working
// directory is the bundle directory itself (device and inode: only the euid can enter a 0700
// directory of its own), and its executable is a file no other user can write (the library's
// binary, or an earlier build of it that a restarted supervisor replaced). The pid and start time
// found are then used through a pidfd, re-checked once it is open.

// Serves reports whether the running process id serves the bundle directory dir.
func Serves(id proc.Ident, dir *owned.Dir) bool {
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

// Find looks through /proc for the process serving the bundle directory dir.
func Find(dir *owned.Dir) (proc.Ident, bool) {
	dev, ino := dir.Ident()
	shims := FindAll()
	id, ok := shims[proc.FileIdent{Dev: dev, Ino: ino}]
	return id, ok
}

// FindAll maps each directory a shim or keeper of the library serves to that process.
func FindAll() map[proc.FileIdent]proc.Ident {
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

// Open returns a handle on the shim id when it still serves dir, or os.ErrProcessDone.
func Open(id proc.Ident, dir *owned.Dir) (*proc.Handle, error) {
	if dir == nil {
		return nil, os.ErrProcessDone
	}
	h, err := id.Open()
	if err != nil {
		return nil, err
	}
	if !Serves(id, dir) {
		_ = h.Close()
		return nil, os.ErrProcessDone
	}
	return h, nil
}

func itoa(n int) string { return strconv.Itoa(n) }

// CheckpointRecord is <bundle>/checkpoint.json.
type CheckpointRecord struct {
	Image string    `json:"image"`
	At    time.Time `json:"at"`
}

// checkpointedTo returns the image directory of the checkpoint recorded in the bundle, or "".
func checkpointedTo(dir *owned.Dir) string {
	var rec CheckpointRecord
	if dir == nil || bundle.ReadRecord(dir, bundle.Checkpoint, &rec) != nil || !filepath.IsAbs(rec.Image) {
		return ""
	}
	return filepath.Clean(rec.Image)
}

// CheckpointWritten reports whether image holds a checkpoint runsc wrote: a cell that exited
// while its checkpoint was being taken leaves none.
func CheckpointWritten(image string) bool {
	d, err := owned.Open(image)
	if err != nil {
		return false
	}
	defer d.Close()
	st, err := d.Lstat(CheckpointImage)
	return err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Size > 0
}

// ResumePaused resumes a cell that Pause left paused (see bundle.Paused). Destroy and the shim's
// lifetime limit call it before they send SIGKILL.
func ResumePaused(r *runsc.Runsc, runscID string, dir *owned.Dir) {
	if dir == nil || r.Path == "" {
		return
	}
	if _, err := dir.Lstat(bundle.Paused); err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), runscTimeout)
	defer cancel()
	if r.Resume(ctx, runscID) == nil {
		_ = dir.Remove(bundle.Paused)
	}
}
