// Package runsc owns gVisor's runsc command line: the global flags a cell's runsc gets, the argv of
// every subcommand the library uses, the one place a runsc process is made (Command) and started
// (Start: inside the cell's control network namespace when it has one), the files runsc keeps in
// its state root, the container ids the library gives runsc, and the probe of a binary (what
// version, flags and platforms it has).
package runsc

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

// The container ids the library gives runsc. runsc matches ids by prefix and they are global on
// a host (Debian's abstract control sockets), so every id has a fixed width: a cell's is IDPrefix
// and 24 hex digits, a warm-pool sandbox's PoolIDPrefix and 24 hex digits, and no id of one kind
// is a prefix of the other kind's.
const (
	IDPrefix     = "cellos-"      // + 24 hex digits: a cell
	PoolIDPrefix = "cellos-pool-" // + PoolNameLen hex digits: a warm-pool sandbox
	PoolNameLen  = 24
)

// CellID is the runsc id of a cell: a fixed-width digest of the bundle root and the cell id.
func CellID(bundleRoot, cellID string) string {
	sum := sha256.Sum256([]byte(bundleRoot + "\x00" + cellID))
	return IDPrefix + hex.EncodeToString(sum[:12])
}

// PoolID is the runsc id of a warm-pool sandbox: a digest of the bundle root and the device and
// inode of the sandbox's directory, which stays the same when the directory becomes a cell's
// bundle. A pooled cell's runsc id is thus derived from its bundle directory, never read.
func PoolID(bundleRoot string, dev, ino uint64) string {
	return PoolIDPrefix + PoolName(bundleRoot, dev, ino)
}

// PoolName is the name of a pool entry's directory and the digits of its sandbox's runsc id.
func PoolName(bundleRoot string, dev, ino uint64) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "%s\x00%d\x00%d", bundleRoot, dev, ino))
	return hex.EncodeToString(sum[:PoolNameLen/2])
}

// IsPoolID reports whether id is a warm-pool sandbox's runsc id.
func IsPoolID(id string) bool {
	name, ok := strings.CutPrefix(id, PoolIDPrefix)
	return ok && ValidPoolName(name)
}

// ValidPoolName reports whether name can be a pool entry's name.
func ValidPoolName(name string) bool {
	return len(name) == PoolNameLen && isHex(name)
}

// Runsc renders runsc command lines for one binary and state root. Every invocation is made by
// Command and started by Start.
type Runsc struct {
	Path     string   // the binary
	Root     string   // --root: the library's private state directory
	Platform string   // --platform; "" leaves runsc's default
	Rootless bool     // --rootless, when the library does not run as root
	Extra    []string // operator flags, placed after the library's own
	// NetNS is the cell's control network namespace (a pinned namespace file): every runsc
	// process of the cell runs in it, so that the abstract control sockets of runsc versions that
	// use them are out of reach of the host's other users. "" runs runsc in the caller's.
	NetNS string `json:",omitempty"`

	NoOverlay2 bool `json:"-"` // the binary has no --overlay2 (Probed.Info)
}

// CellFlags are the global flags that differ per cell.
type CellFlags struct {
	Log           string // runsc's own log, JSON; "" for management commands (errors go to stderr)
	IgnoreCgroups bool
	Overlay       string // --overlay2 value
	Network       string `json:",omitempty"` // --network: "sandbox" or "host" for a cell with egress rules (network.go); "" is none
}

// GlobalArgs renders the global flags in a fixed order.
func (r *Runsc) GlobalArgs(c *CellFlags) []string {
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

// RunArgs is the argv (without the binary) that runs a cell in the foreground.
func (r *Runsc) RunArgs(c CellFlags, bundle, id string) []string {
	return append(r.GlobalArgs(&c), "run", "--bundle", bundle, id)
}

// Command is a runsc invocation; Start starts it. Every runsc process of the library is made and
// started by these two.
func (r *Runsc) Command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, r.Path, args...)
	cmd.WaitDelay = time.Second
	return cmd
}

// Start starts cmd, a runsc command, in the cell's control namespace when it has one.
func (r *Runsc) Start(cmd *exec.Cmd) error {
	if r.NetNS == "" {
		return cmd.Start()
	}
	return ctlns.Start(cmd, r.NetNS)
}

// Run starts cmd and waits for it.
func (r *Runsc) Run(cmd *exec.Cmd) error {
	if err := r.Start(cmd); err != nil {
		return err
	}
	return cmd.Wait()
}

// Output runs runsc with args (no global flags added) in dir and returns what it printed, trimmed
// to its last 2000 bytes. The output goes to a file, never a pipe: a sandbox runsc starts inherits
// it and would hold a pipe open.
func (r *Runsc) Output(ctx context.Context, dir string, args ...string) (string, error) {
	out, err := os.CreateTemp("", "cellos-runsc-out-")
	if err != nil {
		return "", err
	}
	defer os.Remove(out.Name())
	defer out.Close()
	cmd := r.Command(ctx, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = out, out
	runErr := r.Run(cmd)
	b, _ := os.ReadFile(out.Name())
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(bytes.TrimSpace(b)), runErr
}

// Error is a failed runsc invocation: its arguments, exit code and what it printed.
type Error struct {
	Args     []string
	ExitCode int // -1 when runsc did not exit normally
	Stderr   string
	Err      error
}

func (e *Error) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" && e.Err != nil {
		msg = e.Err.Error()
	}
	return fmt.Sprintf("runsc %s: exit %d: %s", strings.Join(e.Args, " "), e.ExitCode, msg)
}

func (e *Error) Unwrap() error { return e.Err }

// MaxCapture bounds what the library keeps of a management command's output.
const MaxCapture = 1 << 20

// exec runs a management command and returns its stdout.
func (r *Runsc) exec(ctx context.Context, args ...string) ([]byte, error) {
	full := append(r.GlobalArgs(nil), args...)
	cmd := r.Command(ctx, full...)
	var stdout, stderr BoundedBuffer
	stdout.Max, stderr.Max = MaxCapture, 64<<10
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := r.Run(cmd)
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
	return nil, &Error{Args: args, ExitCode: code, Stderr: stderr.String(), Err: err}
}

// Delete removes a container; with force it kills a running one first. Deleting a container
// runsc does not know succeeds with force.
func (r *Runsc) Delete(ctx context.Context, id string) error {
	_, err := r.exec(ctx, "delete", "--force", id)
	return err
}

// Kill sends a signal to a container's init process.
func (r *Runsc) Kill(ctx context.Context, id, signal string) error {
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
func (r *Runsc) List(ctx context.Context) ([]ContainerState, error) {
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

// StateFiles lists what runsc keeps in its state root for a container id.
func (r *Runsc) StateFiles(id string) []string {
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

// StateIDs returns the ids of the library's containers that have files in the state root, read
// from the file names (`<id>.state`, `<id>_sandbox:<id>.state` and their `.lock`s), without
// running runsc: a `runsc list` loads every container, and loading one that is being deleted
// creates its lock file again. other reports entries that are not the library's.
func (r *Runsc) StateIDs() (ids map[string]bool, other bool) {
	entries, err := os.ReadDir(r.Root)
	if err != nil {
		return nil, false
	}
	ids = map[string]bool{}
	for _, e := range entries {
		name := e.Name()
		n := 0
		switch {
		case name == NullNetNS:
			continue
		case strings.HasPrefix(name, PoolIDPrefix):
			n = len(PoolIDPrefix) + PoolNameLen
		case strings.HasPrefix(name, IDPrefix):
			n = len(IDPrefix) + 24 // RunscID: 12 bytes of digest in hex
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

// RemoveStaleLocks removes the lock files of a container that has no state file — what a sandbox
// that was stopped while starting leaves, and `runsc delete --force` does not remove — and
// returns the state files that remain. The caller must know that no runsc process of the
// container is alive.
func (r *Runsc) RemoveStaleLocks(id string) []string {
	left := r.StateFiles(id)
	for _, f := range left {
		if !strings.HasSuffix(f, ".lock") {
			return left
		}
	}
	for _, f := range left {
		_ = os.Remove(f)
	}
	return r.StateFiles(id)
}

// BoundedBuffer keeps the first max bytes written to it and discards the rest.
type BoundedBuffer struct {
	bytes.Buffer
	Max int
}

func (b *BoundedBuffer) Write(p []byte) (int, error) {
	if room := b.Max - b.Len(); room > 0 {
		b.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}
