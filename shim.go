package gvisor

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
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
	"github.com/cellos/cellos-host-gvisor/internal/proc"
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
// line, shimRequest: the bundle, identified by path, device and inode, and everything the shim
// needs, runsc's command line included), fd 3 one answer ("ok" once runsc runs, or "error: ...").
// Nothing the shim acts on is read back from the bundle, which it opens as an owned directory
// and checks to be the one the supervisor made. A shim is started before it is needed (spare.go):
// it waits on fd 4 and exits when that pipe closes without a request.
const (
	shimArgv0    = "cellos-gvisor-shim"
	shimEnv      = "CELLOS_GVISOR_SHIM"
	shimProtocol = 1
	maxRequest   = 1 << 20
)

func init() {
	if len(os.Args) == 1 && os.Getenv(shimEnv) == "1" {
		switch os.Args[0] {
		case shimArgv0:
			os.Exit(shimMain())
		case keeperArgv0:
			os.Exit(keeperMain())
		}
	}
}

// shimRequest is the supervisor's request to a shim: serve the cell whose bundle this is.
type shimRequest struct {
	Protocol int        `json:"protocol"`
	Bundle   string     `json:"bundle"`
	Dev      uint64     `json:"dev"` // the bundle directory's device and inode, as the supervisor made it
	Ino      uint64     `json:"ino"`
	Config   shimConfig `json:"config"`
}

// shimConfig is what the shim does for its cell. A copy is left in the bundle (shim.json) for
// operators; the library never reads it.
type shimConfig struct {
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
func (r *shimRequest) check() error {
	switch {
	case r.Protocol != shimProtocol:
		return fmt.Errorf("protocol %d, this shim speaks %d", r.Protocol, shimProtocol)
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

// exitRecord is <bundle>/exit.json: how the cell ended, written once by the shim.
type exitRecord struct {
	Status    cellos.ExitStatus `json:"status"`
	Error     string            `json:"error,omitempty"` // runsc's own failure; Status is meaningless then
	Runsc     string            `json:"runsc"`           // how the runsc process ended: "exit 7", "signal 9"
	StartedAt time.Time         `json:"startedAt"`
	ExitedAt  time.Time         `json:"exitedAt"`
	Stdout    streamRecord      `json:"stdout"`
	Stderr    streamRecord      `json:"stderr"`

	// Checkpoint is the image directory when Checkpoint stopped the cell; Status is meaningless then.
	Checkpoint string `json:"checkpoint,omitempty"`
}

type streamRecord struct {
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

// shimMain runs in the shim process: it waits for its request, then serves that cell.
func shimMain() int {
	ignoreSignals()
	answers, requests := shimPipes()
	a := &answerer{f: answers}
	var req shimRequest
	err := readRequest(bufio.NewReader(requests), &req)
	_ = requests.Close()
	if errors.Is(err, io.EOF) {
		return 0 // not needed: Close, or the supervisor is gone
	}
	if err == nil {
		err = req.check()
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
func serve(dir *owned.Dir, cfg *shimConfig, a *answerer) int {
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
func writeExit(dir *owned.Dir, reserve *os.File, rec *exitRecord) error {
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

func runShim(dir *owned.Dir, cfg *shimConfig, started func()) (*exitRecord, error) {
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
	cmd.Env = shimChildEnv()
	cmd.WaitDelay = 0
	rec := &exitRecord{StartedAt: time.Now().UTC()}
	if err := cfg.Runsc.Start(cmd); err != nil {
		return nil, fmt.Errorf("starting runsc: %w", err)
	}
	_ = outW.Close()
	_ = errW.Close()
	started()

	outDone := make(chan streamRecord, 1)
	errDone := make(chan streamRecord, 1)
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
		releaseSandbox(&cfg.Runsc, cfg.RunscID) // the pool sandbox goes with its workload, as a cold cell's with runsc run
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
func (cfg *shimConfig) runscArgs(bpath string) []string {
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
func killExpired(cfg *shimConfig, dir *owned.Dir, cmd *exec.Cmd, exited <-chan struct{}) {
	resumePaused(&cfg.Runsc, cfg.RunscID, dir) // a paused sandbox does not take SIGKILL
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
func interpret(rec *exitRecord, cfg *shimConfig, dir *owned.Dir, ps *os.ProcessState, waitErr error, deadline bool) {
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
		if image := checkpointedTo(dir); image != "" && checkpointWritten(image) {
			rec.Checkpoint = image
			return
		}
	}
	if code == 128 {
		if msg := runscFailure(dir, bundle.RunscLog); msg != "" {
			rec.Error = runsc.Clip(msg, maxErrorMsg)
			return
		}
	}
	rec.Status = classify(code)
	if rec.Status.Reason == cellos.ExitSignaled && cfg.MemoryCgroup != "" {
		if n, err := cgroups.OOMKills(cfg.MemoryCgroup); err == nil && n > 0 {
			rec.Status.Reason = cellos.ExitOOMKilled
		}
	}
}

// classify maps a runsc exit code to a status. Codes 129..192 are reported as deaths by signal
// code-128: runsc reports a workload killed by signal N and one that called exit(128+N) alike,
// so this is an inference.
func classify(code int) cellos.ExitStatus {
	if code > 128 && code <= 128+64 {
		return cellos.ExitStatus{Code: code, Signal: code - 128, Reason: cellos.ExitSignaled}
	}
	return cellos.ExitStatus{Code: code, Reason: cellos.ExitExited}
}

// runscFailure returns the error-level messages of runsc's JSON log name in dir, or "".
func runscFailure(dir *owned.Dir, name string) string {
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
func capture(r io.Reader, w io.Writer, limit int64, name string) streamRecord {
	var rec streamRecord
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

// shimChildEnv is the shim's environment for runsc, without the shim's own marker.
func shimChildEnv() []string {
	env := os.Environ()
	out := env[:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, shimEnv+"=") && !strings.HasPrefix(kv, "GORACE=") {
			out = append(out, kv)
		}
	}
	return out
}

// pidRecord identifies a process across pid reuse: its pid and its start time.
type pidRecord = proc.Ident

// processStart reads a process's start time from /proc.
func processStart(pid int) (uint64, error) {
	st, err := proc.ReadStat(pid)
	return st.Start, err
}
