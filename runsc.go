package gvisor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/ctlns"
)

// runscIDPrefix starts every runsc container id the library uses.
const runscIDPrefix = "cellos-"

// RunscID is the runsc container id of a cell: a fixed-width digest of the bundle root and the
// cell id. runsc matches ids by prefix, so ids of one width are never ambiguous; and ids are
// global on the host (abstract sockets), so two bundle roots never share one.
func RunscID(bundleRoot, cellID string) string {
	sum := sha256.Sum256([]byte(bundleRoot + "\x00" + cellID))
	return runscIDPrefix + hex.EncodeToString(sum[:12])
}

// runsc renders runsc command lines. Every invocation goes through command().
type runsc struct {
	Path     string   // the binary
	Root     string   // --root: the library's private state directory
	Platform string   // --platform; "" leaves runsc's default
	Rootless bool     // --rootless, when the library does not run as root
	Extra    []string // operator flags, placed after the library's own
	// NetNS is the cell's control network namespace (a pinned namespace file): every runsc
	// process of the cell runs in it, so that the abstract control sockets of runsc versions that
	// use them are out of reach of the host's other users. "" runs runsc in the caller's.
	NetNS string `json:",omitempty"`

	noOverlay2 bool // the binary has no --overlay2 (see probe.go); not part of shim.json
}

// cellFlags are the global flags that differ per cell.
type cellFlags struct {
	Log           string // runsc's own log, JSON; "" for management commands (errors go to stderr)
	IgnoreCgroups bool
	Overlay       string // --overlay2 value
	Network       string `json:",omitempty"` // --network: "sandbox" or "host" for a cell with egress rules (network.go); "" is none
}

// globalArgs renders the global flags in a fixed order.
func (r *runsc) globalArgs(c *cellFlags) []string {
	args := []string{"--root", r.Root}
	if c != nil && c.Log != "" {
		args = append(args, "--log", c.Log, "--log-format=json")
	}
	if r.Rootless {
		args = append(args, "--rootless")
	}
	if r.Platform != "" {
		args = append(args, "--platform="+r.Platform)
	}
	if c != nil {
		network := "none"
		if c.Network != "" {
			network = c.Network
		}
		args = append(args, "--network="+network)
		if c.IgnoreCgroups {
			args = append(args, "--ignore-cgroups")
		}
		if c.Overlay != "" {
			args = append(args, "--overlay2="+c.Overlay)
		}
	}
	return append(args, r.Extra...)
}

// runArgs is the argv (without the binary) that runs a cell in the foreground.
func (r *runsc) runArgs(c cellFlags, bundle, id string) []string {
	return append(r.globalArgs(&c), "run", "--bundle", bundle, id)
}

// command is a runsc invocation; start starts it. Every runsc process of the library is made and
// started by these two.
func (r *runsc) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, r.Path, args...)
	cmd.WaitDelay = time.Second
	return cmd
}

// start starts cmd, a runsc command, in the cell's control namespace when it has one.
func (r *runsc) start(cmd *exec.Cmd) error {
	if r.NetNS == "" {
		return cmd.Start()
	}
	return ctlns.Start(cmd, r.NetNS)
}

// run starts cmd and waits for it.
func (r *runsc) run(cmd *exec.Cmd) error {
	if err := r.start(cmd); err != nil {
		return err
	}
	return cmd.Wait()
}

// RunscError is a failed runsc invocation: its arguments, exit code and what it printed.
type RunscError struct {
	Args     []string
	ExitCode int // -1 when runsc did not exit normally
	Stderr   string
	Err      error
}

func (e *RunscError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" && e.Err != nil {
		msg = e.Err.Error()
	}
	return fmt.Sprintf("runsc %s: exit %d: %s", strings.Join(e.Args, " "), e.ExitCode, msg)
}

func (e *RunscError) Unwrap() error { return e.Err }

// maxCapture bounds what the library keeps of a management command's output.
const maxCapture = 1 << 20

// exec runs a management command and returns its stdout.
func (r *runsc) exec(ctx context.Context, args ...string) ([]byte, error) {
	full := append(r.globalArgs(nil), args...)
	cmd := r.command(ctx, full...)
	var stdout, stderr boundedBuffer
	stdout.max, stderr.max = maxCapture, 64<<10
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := r.run(cmd)
	if err == nil {
		return stdout.Bytes(), nil
	}
	code := -1
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		err = fmt.Errorf("%w (%w)", ctxErr, err)
	}
	return nil, &RunscError{Args: args, ExitCode: code, Stderr: stderr.String(), Err: err}
}

// Delete removes a container; with force it kills a running one first. Deleting a container
// runsc does not know succeeds with force.
func (r *runsc) Delete(ctx context.Context, id string) error {
	_, err := r.exec(ctx, "delete", "--force", id)
	return err
}

// Kill sends a signal to a container's init process.
func (r *runsc) Kill(ctx context.Context, id, signal string) error {
	_, err := r.exec(ctx, "kill", id, signal)
	return err
}

// ContainerState is one entry of `runsc list --format=json`.
type ContainerState struct {
	ID     string `json:"id"`
	Pid    int    `json:"pid"`
	Status string `json:"status"`
	Bundle string `json:"bundle"`
}

// List returns the containers in the state root.
func (r *runsc) List(ctx context.Context) ([]ContainerState, error) {
	out, err := r.exec(ctx, "list", "--format=json")
	if err != nil {
		return nil, err
	}
	var states []ContainerState
	if err := json.Unmarshal(bytes.TrimSpace(out), &states); err != nil {
		return nil, fmt.Errorf("runsc list: %w", err)
	}
	return states, nil
}

// stateFiles lists what runsc keeps in its state root for a container id.
func (r *runsc) stateFiles(id string) []string {
	entries, err := os.ReadDir(r.Root)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		if strings.Contains(e.Name(), id) {
			out = append(out, r.Root+"/"+e.Name())
		}
	}
	return out
}

// stateIDs returns the ids of the library's containers that have files in the state root, read
// from the file names (`<id>.state`, `<id>_sandbox:<id>.state` and their `.lock`s), without
// running runsc: a `runsc list` loads every container, and loading one that is being deleted
// creates its lock file again. other reports entries that are not the library's.
func (r *runsc) stateIDs() (ids map[string]bool, other bool) {
	entries, err := os.ReadDir(r.Root)
	if err != nil {
		return nil, false
	}
	ids = map[string]bool{}
	for _, e := range entries {
		name := e.Name()
		n := 0
		switch {
		case name == nullNetNS:
			continue
		case strings.HasPrefix(name, poolIDPrefix):
			n = len(poolIDPrefix) + poolNameLen
		case strings.HasPrefix(name, runscIDPrefix):
			n = len(runscIDPrefix) + 24 // RunscID: 12 bytes of digest in hex
		}
		if n == 0 || len(name) <= n || (name[n] != '.' && name[n] != '_') || !isHex(name[n-24:n]) {
			other = true
			continue
		}
		ids[name[:n]] = true
	}
	return ids, other
}

func isHex(s string) bool {
	for i := range len(s) {
		if !strings.ContainsRune("0123456789abcdef", rune(s[i])) {
			return false
		}
	}
	return true
}

// removeStaleLocks removes the lock files of a container that has no state file — what a sandbox
// that was stopped while starting leaves, and `runsc delete --force` does not remove — and
// returns the state files that remain. The caller must know that no runsc process of the
// container is alive.
func (r *runsc) removeStaleLocks(id string) []string {
	left := r.stateFiles(id)
	for _, f := range left {
		if !strings.HasSuffix(f, ".lock") {
			return left
		}
	}
	for _, f := range left {
		_ = os.Remove(f)
	}
	return r.stateFiles(id)
}

// boundedBuffer keeps the first max bytes written to it and discards the rest.
type boundedBuffer struct {
	bytes.Buffer
	max int
}

func (b *boundedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.Len(); room > 0 {
		b.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}
