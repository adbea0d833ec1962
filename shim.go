package gvisor

import (
	"bufio"
	"context"
	"encoding/json"
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

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
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
const (
	shimArgv0 = "cellos-gvisor-shim"
	shimEnv   = "CELLOS_GVISOR_SHIM"
)

func init() {
	if len(os.Args) == 2 && os.Args[0] == shimArgv0 && os.Getenv(shimEnv) == "1" {
		if os.Args[1] == spareArg {
			os.Exit(spareMain())
		}
		os.Exit(shimMain(os.Args[1]))
	}
}

// shimConfig is what the library tells the shim, in <bundle>/shim.json.
type shimConfig struct {
	CellID       string    `json:"cellId"`
	RunscID      string    `json:"runscId"`
	Runsc        runsc     `json:"runsc"`
	Flags        cellFlags `json:"flags"`
	TTLSeconds   int64     `json:"ttlSeconds,omitempty"`
	OutputCap    int64     `json:"outputCap"`
	MemoryCgroup string    `json:"memoryCgroup,omitempty"` // read for OOM kills after the exit
	RestoreImage string    `json:"restoreImage,omitempty"` // restore from this checkpoint instead of running config.json's process
	Pool         *poolShim `json:"pool,omitempty"`         // the cell runs in a warm-pool sandbox: runsc exec of its process (pool.go)
}

// runscArgs is the argv (without the binary) of the runsc process the shim waits on: `run`, or
// `restore` for a cell restored from a checkpoint.
func (cfg *shimConfig) runscArgs(bundle string) []string {
	if cfg.RestoreImage != "" {
		return cfg.Runsc.restoreArgs(cfg.Flags, bundle, cfg.RunscID, cfg.RestoreImage)
	}
	if cfg.Pool != nil {
		return cfg.pooledExecArgs(bundle)
	}
	return cfg.Runsc.runArgs(cfg.Flags, bundle, cfg.RunscID)
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

// shimMain runs in the shim process. Its stderr is <bundle>/shim.log; fd 3 is the readiness pipe
// to the library: one line, "ok" once runsc has started, or the reason it could not.
// ignoreSignals makes the shim deaf to the signals of a terminal and of a closed pipe.
func ignoreSignals() {
	signal.Ignore(syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGPIPE, syscall.SIGTTOU, syscall.SIGTTIN)
}

func shimMain(bundle string) int {
	ignoreSignals()
	syscall.CloseOnExec(3) // not runsc's
	ready := os.NewFile(3, "ready")
	say := func(msg string) {
		if ready != nil {
			_, _ = io.WriteString(ready, msg+"\n")
			_ = ready.Close()
			ready = nil
		}
	}
	rec, err := runShim(bundle, func() { say("ok") })
	if err != nil {
		fmt.Fprintf(os.Stderr, "cellos shim: %v\n", err)
		say("error: " + err.Error())
		return 1
	}
	if err := writeJSONAtomic(filepath.Join(bundle, fileExit), rec); err != nil {
		fmt.Fprintf(os.Stderr, "cellos shim: recording the exit: %v\n", err)
		return 1
	}
	return 0
}

func runShim(bundle string, started func()) (*exitRecord, error) {
	var cfg shimConfig
	if err := readJSON(filepath.Join(bundle, fileShim), &cfg); err != nil {
		return nil, err
	}
	outFile, err := os.OpenFile(filepath.Join(bundle, fileStdout), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return nil, err
	}
	defer outFile.Close()
	errFile, err := os.OpenFile(filepath.Join(bundle, fileStderr), os.O_WRONLY|os.O_APPEND, 0)
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
	if err := writePidFile(filepath.Join(bundle, fileShimPid), os.Getpid()); err != nil {
		return nil, err
	}

	cmd := exec.Command(cfg.Runsc.Path, cfg.runscArgs(bundle)...)
	cmd.Dir = bundle
	cmd.Stdout, cmd.Stderr = outW, errW
	cmd.Env = shimChildEnv()
	rec := &exitRecord{StartedAt: time.Now().UTC()}
	if err := cmd.Start(); err != nil {
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
			killExpired(&cfg, cmd, exited)
		}
	}
	<-exited
	rec.ExitedAt = time.Now().UTC()
	if cfg.Pool != nil {
		releasePooled(&cfg) // the pool sandbox goes with its workload, as a cold cell's with runsc run
	}

	// The sandbox's processes hold the pipes too; they are gone or going once runsc has
	// exited. Do not let a straggler hold the record back.
	drain := time.AfterFunc(3*time.Second, func() { _ = outR.Close(); _ = errR.Close() })
	rec.Stdout, rec.Stderr = <-outDone, <-errDone
	drain.Stop()
	_ = outR.Close()
	_ = errR.Close()

	interpret(rec, &cfg, bundle, cmd.ProcessState, waitErr, deadlineHit)
	return rec, nil
}

// killExpired ends a cell whose lifetime is over: SIGKILL through runsc, then, if runsc run has
// not exited after a grace period, SIGKILL to runsc itself and a forced delete.
func killExpired(cfg *shimConfig, cmd *exec.Cmd, exited <-chan struct{}) {
	resumePaused(&cfg.Runsc, cfg.RunscID, cmd.Dir) // a paused sandbox does not take SIGKILL
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
func interpret(rec *exitRecord, cfg *shimConfig, bundle string, ps *os.ProcessState, waitErr error, deadline bool) {
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
	if image := checkpointedTo(bundle); code == 0 && image != "" {
		// runsc run exits 0 when its container is checkpointed: that is not the workload's exit.
		rec.Checkpoint = image
		return
	}
	if code == 128 {
		if msg := runscFailure(filepath.Join(bundle, fileRunscLog)); msg != "" {
			rec.Error = msg
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

// runscFailure returns the error-level messages of runsc's JSON log, or "".
func runscFailure(logPath string) string {
	f, err := os.Open(logPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	var msgs []string
	sc := bufio.NewScanner(io.LimitReader(f, 1<<20))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
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

// pidRecord identifies a process across pid reuse: its pid and its start time in clock ticks
// since boot (field 22 of /proc/<pid>/stat).
type pidRecord struct {
	Pid   int    `json:"pid"`
	Start uint64 `json:"start"`
}

func writePidFile(path string, pid int) error {
	start, err := processStart(pid)
	if err != nil {
		return err
	}
	return writeJSONAtomic(path, pidRecord{Pid: pid, Start: start})
}

// processStart reads a process's start time from /proc.
func processStart(pid int) (uint64, error) {
	st, err := proc.ReadStat(pid)
	return st.Start, err
}

// alive reports whether the process recorded in rec still runs (and is not a zombie).
func (rec pidRecord) alive() bool {
	st, err := proc.ReadStat(rec.Pid)
	return err == nil && st.Start == rec.Start && st.State != 'Z' && st.State != 'X'
}

func writeJSONAtomic(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
