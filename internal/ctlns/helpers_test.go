package ctlns

// Shared helpers of this package's tests: the re-executed helper process, a trivial OCI bundle,
// and runsc commands run inside or outside a pin.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/testkit"
	"golang.org/x/sys/unix"
)

// The helper process: the test binary re-executed with helperEnv set runs one action and exits.
const helperEnv = "CTLNS_TEST_HELPER"

// unprivileged is the uid and gid the helper runs as where a test needs a user without
// privileges.
const unprivileged = 12345

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "connect":
		// Connect to the abstract Unix socket os.Args[1], written as /proc/net/unix shows it
		// ("@" for each NUL); print "connected" or the errno's name.
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err == nil {
			// A leading "@" makes the address abstract; the other NULs are literal.
			addr := "@" + strings.ReplaceAll(os.Args[1][1:], "@", "\x00")
			err = unix.Connect(fd, &unix.SockaddrUnix{Name: addr})
		}
		if err != nil {
			var en syscall.Errno
			if errors.As(err, &en) {
				fmt.Println(unix.ErrnoName(en))
				os.Exit(0)
			}
			fmt.Println(err)
			os.Exit(2)
		}
		fmt.Println("connected")
		os.Exit(0)
	case "create":
		// Create os.Args[1] as this (unprivileged) user; print the error.
		if err := Create(os.Args[1]); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		os.Exit(0)
	case "probe":
		// ProbeAbstract(os.Args[1] (runsc), os.Args[2] (bundle)); print the result.
		found, err := ProbeAbstract(testContext(), runner(os.Args[1], os.Args[2]), os.Args[2])
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Println(found)
		os.Exit(0)
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
		os.Exit(2)
	}
}

// helper returns the test binary re-executed as the helper process running action, as the
// unprivileged user. /proc/self/exe lets that user run it although the build directory is
// private to root.
func helper(action string, args ...string) *exec.Cmd {
	cmd := exec.Command("/proc/self/exe", args...)
	cmd.Args[0] = "ctlns-helper"
	cmd.Env = append(os.Environ(), helperEnv+"="+action)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: unprivileged, Gid: unprivileged}}
	return cmd
}

// testContext is the context of the tests' commands: go test's -timeout bounds them.
func testContext() context.Context { return context.Background() }

// publicDir returns a new directory that every user can reach (t.TempDir's parent is private to
// its owner), removed at cleanup.
func publicDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ctlns-test-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
}

// runscBin is the runsc under test: $CELLOS_GVISOR_RUNSC_BIN, else runsc on $PATH. Without one
// the test is skipped, or fails under CELLOS_REQUIRE_RUNSC=1.
func runscBin(t testing.TB) string {
	t.Helper()
	needRoot(t)
	return testkit.Runsc(t)
}

// nsID names the network namespace of a namespace file or /proc/<pid>/ns/net link, as
// "net:[inode]".
func nsID(t testing.TB, path string) string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return fmt.Sprintf("net:[%d]", st.Ino)
}

// inNS runs f on a thread moved into the network namespace at path.
func inNS(t testing.TB, path string, f func() error) {
	t.Helper()
	ns, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	err = onThread(func(*os.File) error {
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			return err
		}
		return f()
	})
	if err != nil {
		t.Fatal(err)
	}
}

// writeBundle writes an OCI bundle at dir running argv as uid 65534 without capabilities, its
// root an empty directory holding read-only binds of the host's /usr, /bin, /lib, /lib64, /sbin
// (a symbolic link where the host has one). netns is the network namespace's path; "" asks for a
// new namespace and "-" leaves the network namespace out of the config.
func writeBundle(t testing.TB, dir, netns string, argv ...string) {
	t.Helper()
	rootfs := filepath.Join(dir, "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{dir, rootfs} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mounts := []map[string]any{
		{"destination": "/proc", "type": "proc", "source": "proc"},
		{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": []string{"nosuid", "nodev", "mode=1777"}},
	}
	for _, p := range []string{"/usr", "/bin", "/lib", "/lib64", "/sbin"} {
		fi, err := os.Lstat(p)
		if err != nil {
			continue
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			target, err := os.Readlink(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(target, filepath.Join(rootfs, p)); err != nil {
				t.Fatal(err)
			}
			continue
		}
		mounts = append(mounts, map[string]any{"destination": p, "type": "bind", "source": p,
			"options": []string{"rbind", "ro", "nosuid", "nodev"}})
	}
	ns := []map[string]any{{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}}
	switch netns {
	case "":
		ns = append(ns, map[string]any{"type": "network"})
	case "-":
	default:
		ns = append(ns, map[string]any{"type": "network", "path": netns})
	}
	spec := map[string]any{
		"ociVersion": "1.0.2",
		"process": map[string]any{
			"user":            map[string]any{"uid": 65534, "gid": 65534},
			"args":            argv,
			"env":             []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
			"cwd":             "/",
			"capabilities":    map[string]any{},
			"noNewPrivileges": true,
		},
		"root":     map[string]any{"path": "rootfs", "readonly": true},
		"hostname": "ctlns",
		"mounts":   mounts,
		"linux":    map[string]any{"namespaces": ns},
	}
	data, err := json.MarshalIndent(spec, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// runscCLI runs runsc commands for one container, inside the pin when pin is set.
type runscCLI struct {
	t      testing.TB
	bin    string
	root   string
	global []string // flags after --root
	pin    string
}

func newRunsc(t testing.TB, bin string, global ...string) *runscCLI {
	t.Helper()
	root := filepath.Join(t.TempDir(), "state")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	r := &runscCLI{t: t, bin: bin, root: root, global: global}
	t.Cleanup(func() { _ = removeRoot(root) })
	return r
}

// in returns a copy of r whose commands run in the namespace pinned at pin ("" for the
// caller's).
func (r *runscCLI) in(pin string) *runscCLI {
	c := *r
	c.pin = pin
	return &c
}

// run runs runsc with args and returns its combined output. Output goes to a file: a sandbox
// started by run --detach inherits it.
func (r *runscCLI) run(args ...string) (string, error) {
	r.t.Helper()
	out, err := os.CreateTemp(r.t.TempDir(), "out-")
	if err != nil {
		r.t.Fatal(err)
	}
	defer out.Close()
	argv := append(append([]string{"--root", r.root}, r.global...), args...)
	cmd := exec.CommandContext(testContext(), r.bin, argv...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.WaitDelay = time.Second
	if r.pin != "" {
		err = Run(cmd, r.pin)
	} else {
		err = cmd.Run()
	}
	b, _ := os.ReadFile(out.Name())
	return strings.TrimSpace(string(b)), err
}

// state returns the container's status and sandbox pid as runsc state reports them.
func (r *runscCLI) state(id string) (string, int, error) {
	r.t.Helper()
	out, err := r.run("state", id)
	if err != nil {
		return "", 0, fmt.Errorf("%w: %s", err, out)
	}
	var st struct {
		Status string `json:"status"`
		Pid    int    `json:"pid"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return "", 0, fmt.Errorf("runsc state: %w: %s", err, out)
	}
	return st.Status, st.Pid, nil
}

// gofers returns the pids of the runsc gofer processes whose command line mentions needle (their
// bundle directory).
func gofers(needle string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := bytes.Split(bytes.TrimRight(cmdline, "\x00"), []byte{0})
		var gofer, mine bool
		for _, a := range args {
			gofer = gofer || string(a) == "gofer"
			mine = mine || bytes.Contains(a, []byte(needle))
		}
		if gofer && mine {
			pids = append(pids, pid)
		}
	}
	return pids
}

// runner runs the runsc binary in dir for ProbeAbstract, its output to a file.
func runner(runsc, dir string) Runner {
	return func(ctx context.Context, args ...string) (string, error) { return runRunsc(ctx, runsc, dir, args) }
}

// runRunsc runs runsc with args, its output to a file rather than a pipe: a sandbox it creates
// inherits the output and would hold a pipe open.
func runRunsc(ctx context.Context, runsc, dir string, args []string) (string, error) {
	out, err := os.CreateTemp("", "ctlns-probe-out-")
	if err != nil {
		return "", err
	}
	defer os.Remove(out.Name())
	defer out.Close()
	cmd := exec.CommandContext(ctx, runsc, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = out, out
	cmd.WaitDelay = time.Second
	runErr := cmd.Run()
	b, _ := os.ReadFile(out.Name())
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(bytes.TrimSpace(b)), runErr
}
