package runsc

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// The runsc subcommands that operate on running cells. Like the others, each renders a fixed
// argv and goes through Runsc.exec (management commands) or Runsc.Command.

// RestoreArgs is the argv (without the binary) that restores a cell from a checkpoint image in
// the foreground: the shim waits on it as on `run`.
func (r *Runsc) RestoreArgs(c CellFlags, bundle, id, image string) []string {
	return append(r.GlobalArgs(&c), "restore", "--image-path", image, "--bundle", bundle, id)
}

// ExecArgs is the argv (without the binary) that runs the process described in the OCI process
// file inside a running container, in the foreground. runsc writes the process's pid inside the
// sandbox to pidFile once it has started; its own failures go to c.Log as JSON.
func (r *Runsc) ExecArgs(c CellFlags, id, processFile, pidFile string) []string {
	return append(r.GlobalArgs(&c), "exec", "--process", processFile, "--internal-pid-file", pidFile, id)
}

// State returns runsc's view of a container.
func (r *Runsc) State(ctx context.Context, id string) (ContainerState, error) {
	out, err := r.exec(ctx, "state", id)
	if err != nil {
		return ContainerState{}, err
	}
	var st ContainerState
	if err := json.Unmarshal(bytes.TrimSpace(out), &st); err != nil {
		return ContainerState{}, fmt.Errorf("runsc state %s: %w", id, err)
	}
	return st, nil
}

// KillProcess sends a signal to one process of a container, by its pid inside the sandbox.
func (r *Runsc) KillProcess(ctx context.Context, id string, pid int, signal string) error {
	_, err := r.exec(ctx, "kill", "--pid", strconv.Itoa(pid), id, signal)
	return err
}

// Pause freezes every process of a container.
func (r *Runsc) Pause(ctx context.Context, id string) error {
	_, err := r.exec(ctx, "pause", id)
	return err
}

// Resume thaws a paused container.
func (r *Runsc) Resume(ctx context.Context, id string) error {
	_, err := r.exec(ctx, "resume", id)
	return err
}

// Checkpoint saves a container's state into imageDir (checkpoint.img) and stops it.
func (r *Runsc) Checkpoint(ctx context.Context, id, imageDir string) error {
	_, err := r.exec(ctx, "checkpoint", "--image-path", imageDir, id)
	return err
}

// SandboxStats is the part of `runsc events --stats` the library reads. The CPU figure is left
// out on purpose: with --ignore-cgroups it is the caller's cgroup, not the sandbox's.
type SandboxStats struct {
	Memory struct {
		Usage struct {
			Usage uint64 `json:"usage"`
		} `json:"usage"`
	} `json:"memory"`
	Pids struct {
		Current uint64 `json:"current"`
	} `json:"pids"`
}

// Stats returns the sandbox's own accounting of a container's memory and tasks.
func (r *Runsc) Stats(ctx context.Context, id string) (SandboxStats, error) {
	out, err := r.exec(ctx, "events", "--stats", id)
	if err != nil {
		return SandboxStats{}, err
	}
	var ev struct {
		Type string       `json:"type"`
		Data SandboxStats `json:"data"`
	}
	if err := json.Unmarshal(bytes.TrimSpace(out), &ev); err != nil {
		return SandboxStats{}, fmt.Errorf("runsc events --stats %s: %w", id, err)
	}
	return ev.Data, nil
}

// Processes lists a container's processes as pid -> parent pid, from `runsc ps`'s table (its
// JSON format lists pids only).
func (r *Runsc) Processes(ctx context.Context, id string) (map[int]int, error) {
	out, err := r.exec(ctx, "ps", id)
	if err != nil {
		return nil, err
	}
	return parsePs(out)
}

// parsePs reads the PID and PPID columns of `runsc ps`, wherever the header puts them.
func parsePs(out []byte) (map[int]int, error) {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	header := strings.Fields(lines[0])
	pidCol, ppidCol := -1, -1
	for i, h := range header {
		switch h {
		case "PID":
			pidCol = i
		case "PPID":
			ppidCol = i
		}
	}
	if pidCol < 0 || ppidCol < 0 {
		return nil, fmt.Errorf("runsc ps: no PID and PPID columns in %q", lines[0])
	}
	procs := map[int]int{}
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		if len(f) <= max(pidCol, ppidCol) {
			continue
		}
		pid, err1 := strconv.Atoi(f[pidCol])
		ppid, err2 := strconv.Atoi(f[ppidCol])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("runsc ps: malformed line %q", l)
		}
		procs[pid] = ppid
	}
	return procs, nil
}

// RunDetachedArgs is the argv (without the binary) that starts a sandbox and returns once it
// runs (a warm-pool sandbox).
func (r *Runsc) RunDetachedArgs(c CellFlags, bundle, id string) []string {
	return append(r.GlobalArgs(&c), "run", "--detach", "--bundle", bundle, id)
}
