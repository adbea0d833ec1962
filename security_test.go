package gvisor_test

// Regression tests of the security review (issue 12, "Trust nothing the library did not
// create"), against the real runsc. Each plays an unprivileged local user — nobody (65534), or a
// uid without an account — against a library running as root, and checks what the library
// guarantees: it refuses bundle and state roots that another user controls, and then writes
// nothing; it takes no instruction from a bundle file (the runsc binary, namespace and cgroup
// names, which process is a shim); it refuses documents that reach its own state or the host's;
// cells get default limits; no other user reaches a cell's sandbox controller; a cell's exit is
// recorded when the disk is full.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// Options of the hardening, as the tests pass them to gvisor.New.
func optAllowRoot(allow bool) []gvisor.Option { return []gvisor.Option{gvisor.WithAllowRoot(allow)} }
func optBindSources(prefixes ...string) []gvisor.Option {
	return []gvisor.Option{gvisor.WithBindSources(prefixes...)}
}
func optMinFreeSpace(bytes int64) []gvisor.Option {
	return []gvisor.Option{gvisor.WithMinFreeSpace(bytes)}
}

// The local users of these tests.
const (
	nobody    = 65534 // the attacker: a local user without any privilege
	otherUser = 12345 // another local user, without an account
)

// The attacker is also this test binary re-executed as another user: TestAttackerHelper runs the
// scenario named by attackerEnv with the arguments of attackerArgsEnv (a JSON array, since an
// argument may hold a NUL) and prints one "result: " line per outcome. It is a no-op otherwise.
const (
	attackerEnv     = "CELLOS_SECTEST_ATTACKER"
	attackerArgsEnv = "CELLOS_SECTEST_ARGS"
)

func TestAttackerHelper(t *testing.T) {
	scenario := os.Getenv(attackerEnv)
	if scenario == "" {
		return
	}
	var args []string
	if err := json.Unmarshal([]byte(os.Getenv(attackerArgsEnv)), &args); err != nil {
		fmt.Println("result: bad arguments:", err)
		os.Exit(2)
	}
	switch scenario {
	case "connect": // connect to each unix socket address of args
		for _, addr := range args {
			fmt.Println("result:", connectUnix(addr))
		}
	case "exchange": // target, mine, shim.json content, duration, stop file: see exchangeLoop
		d, err := time.ParseDuration(args[3])
		n := 0
		if err == nil {
			n, err = exchangeLoop(args[0], args[1], args[2], d, args[4])
		}
		if err != nil {
			fmt.Println("result: error:", err)
			os.Exit(1)
		}
		fmt.Println("result: exchanged", n, "times")
	default:
		fmt.Println("result: no such scenario:", scenario)
		os.Exit(2)
	}
	os.Exit(0)
}

// connectUnix connects a stream socket to addr (a leading @ is the abstract namespace) and
// reports "connected" or the errno's name.
func connectUnix(addr string) string {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "socket: " + err.Error()
	}
	defer unix.Close(fd)
	err = unix.Connect(fd, &unix.SockaddrUnix{Name: addr})
	var errno unix.Errno
	switch {
	case err == nil:
		return "connected"
	case errors.As(err, &errno):
		return unix.ErrnoName(errno)
	}
	return err.Error()
}

// exchangeLoop is the attacker's race against a Create of the bundle target, an entry of a
// directory the attacker can write, until d has passed or the file stop exists. Each round it
// makes a directory of its own at mine (beside target) holding shimJSON as shim.json and the
// output files a shim opens, waits for the library to make target, and at a random moment in the
// next 20 ms — while the library writes the bundle and its shim starts — swaps the two
// (renameat2 RENAME_EXCHANGE): from then on target is the attacker's directory. It waits for the
// library to remove target, moves aside what is left at mine, and starts again. It returns how
// many swaps took place.
func exchangeLoop(target, mine, shimJSON string, d time.Duration, stop string) (int, error) {
	swaps, aside := 0, 0
	deadline := time.Now().Add(d)
	over := func() bool {
		_, err := os.Lstat(stop)
		return err == nil || time.Now().After(deadline)
	}
	for !over() {
		if _, err := os.Lstat(mine); err == nil {
			aside++
			if err := os.Rename(mine, fmt.Sprintf("%s.%d", mine, aside)); err != nil {
				return swaps, err
			}
		}
		if err := os.Mkdir(mine, 0o755); err != nil {
			return swaps, err
		}
		for name, data := range map[string]string{"shim.json": shimJSON, "stdout.log": "", "stderr.log": ""} {
			if err := os.WriteFile(filepath.Join(mine, name), []byte(data), 0o666); err != nil {
				return swaps, err
			}
		}
		for !over() {
			if _, err := os.Lstat(target); err == nil {
				break
			}
		}
		var r [2]byte
		_, _ = rand.Read(r[:])
		for at := time.Now().Add(time.Duration(int(r[0])<<8|int(r[1])) * 20 * time.Millisecond / 65536); time.Now().Before(at); {
		}
		if unix.Renameat2(unix.AT_FDCWD, target, unix.AT_FDCWD, mine, unix.RENAME_EXCHANGE) == nil {
			swaps++
		}
		for !over() {
			if _, err := os.Lstat(target); err != nil {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	return swaps, nil
}

// attackerBinary is a copy of this test binary that other users can execute (go test's build
// directory is root's alone).
func attackerBinary(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	require.NoError(t, err)
	src, err := os.Open(self)
	require.NoError(t, err)
	defer src.Close()
	path := filepath.Join(publicDir(t), "attacker.test")
	dst, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	require.NoError(t, err)
	_, err = io.Copy(dst, src)
	require.NoError(t, err)
	require.NoError(t, dst.Close())
	require.NoError(t, os.Chmod(path, 0o755))
	return path
}

// attackerCommand is the attacker binary running scenario as uid (and gid) uid, without groups.
func attackerCommand(bin string, uid int, scenario string, args ...string) *exec.Cmd {
	enc, _ := json.Marshal(args)
	cmd := exec.Command(bin, "-test.run=^TestAttackerHelper$", "-test.count=1")
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/bin:/bin", "GORACE=atexit_sleep_ms=0", attackerEnv + "=" + scenario, attackerArgsEnv + "=" + string(enc)}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	return cmd
}

// runAttacker runs a scenario to its end and returns its results.
func runAttacker(t *testing.T, bin string, uid int, scenario string, args ...string) []string {
	t.Helper()
	cmd := attackerCommand(bin, uid, scenario, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "attacker %s as uid %d: %s%s", scenario, uid, out, stderr.String())
	var res []string
	for line := range strings.Lines(string(out)) {
		if r, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "result: "); ok {
			res = append(res, r)
		}
	}
	require.Len(t, res, len(args), "attacker output: %s", out)
	return res
}

// asAttacker runs a shell script as nobody, as a local user without any privilege would.
func asAttacker(t *testing.T, script string) {
	t.Helper()
	cmd := exec.Command("setpriv", "--reuid", strconv.Itoa(nobody), "--regid", strconv.Itoa(nobody), "--clear-groups",
		"/bin/sh", "-eu", "-c", script)
	cmd.Dir = "/"
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "attacker script: %s\n%s", out, script)
}

// shq quotes s for the shell.
func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the attacks of these tests are against a library running as root")
	}
}

// publicDir is a fresh directory that every user can traverse (t.TempDir's parent is root's alone).
func publicDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	for _, p := range []string{filepath.Dir(d), d} {
		require.NoError(t, os.Chmod(p, 0o755))
	}
	return d
}

// stickyDir is a directory like /tmp — root's, world-writable, sticky — that the attacker reaches.
func stickyDir(t *testing.T) string {
	t.Helper()
	d := filepath.Join(publicDir(t), "tmp")
	require.NoError(t, os.Mkdir(d, 0o755))
	require.NoError(t, os.Chmod(d, 0o777|os.ModeSticky))
	return d
}

// stageEvil writes the attacker's stand-in for runsc, world-readable so that the attacker can
// copy it into a directory of its own (the copy is then the attacker's): it records the uid it
// runs as, and its arguments, in a marker file that only root can write, and fails.
func stageEvil(t *testing.T) (staged, marker string) {
	t.Helper()
	marker = filepath.Join(t.TempDir(), "evil-ran") // the directory is root's, 0700
	staged = filepath.Join(publicDir(t), "evil-runsc")
	script := fmt.Sprintf("#!/bin/sh\necho \"uid $(id -u): $*\" >> %s\necho 'not runsc' >&2\nexit 1\n", shq(marker))
	require.NoError(t, os.WriteFile(staged, []byte(script), 0o755))
	return staged, marker
}

func assertEvilNeverRan(t *testing.T, marker string) {
	t.Helper()
	data, err := os.ReadFile(marker)
	runs := strings.Split(strings.TrimSpace(string(data)), "\n")
	assert.True(t, errors.Is(err, os.ErrNotExist), "the attacker's program ran %d times, first as %s", len(runs), runs[0])
}

// assertTreeUnchanged checks that listTree(dir) is still before, and lists what changed.
func assertTreeUnchanged(t *testing.T, dir string, before []string, msgAndArgs ...any) {
	t.Helper()
	after := listTree(dir)
	was := map[string]bool{}
	for _, l := range before {
		was[l] = true
	}
	var changes []string
	for _, l := range after {
		if !was[l] {
			changes = append(changes, "+ "+l)
		}
		delete(was, l)
	}
	for _, l := range before {
		if was[l] {
			changes = append(changes, "- "+l)
		}
	}
	assert.Empty(t, changes, msgAndArgs...)
}

// listTree describes everything under dir, dir included, without following symlinks: path
// (relative to dir), type and permissions, owner, size of files, target of links.
func listTree(dir string) []string {
	var out []string
	_ = filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			out = append(out, p+": "+err.Error())
			return nil
		}
		fi, err := os.Lstat(p)
		if err != nil {
			out = append(out, p+": "+err.Error())
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		line := fmt.Sprintf("%s %v uid=%d", rel, fi.Mode(), fi.Sys().(*syscall.Stat_t).Uid)
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			line += " -> " + target
		case fi.Mode().IsRegular():
			line += " size=" + strconv.FormatInt(fi.Size(), 10)
		}
		out = append(out, line)
		return nil
	})
	return out
}

// pidsNaming lists the processes, other than this one, whose command line names one of needles
// or whose working directory is one of them or below.
func pidsNaming(needles ...string) []int {
	var out []int
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		pid, _ := strconv.Atoi(filepath.Base(p))
		if pid == os.Getpid() {
			continue
		}
		cmdline, _ := os.ReadFile(p + "/cmdline")
		cwd, _ := os.Readlink(p + "/cwd")
		for _, n := range needles {
			if bytes.Contains(cmdline, []byte(n)) || cwd == n || strings.HasPrefix(cwd, n+"/") {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}

// processesNaming describes pidsNaming's processes.
func processesNaming(needles ...string) []string {
	var out []string
	for _, pid := range pidsNaming(needles...) {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		out = append(out, fmt.Sprintf("%d: %s", pid, bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '})))
	}
	return out
}

// sweep is the backstop of a test that today's library leaves in a mess: at cleanup it kills the
// processes that name one of dirs, and deletes the containers runsc still has in the state roots
// dir/.runsc and dir/*/.runsc. A test that passes leaves it nothing to do.
func sweep(t *testing.T, dirs ...string) {
	t.Helper()
	runscBin := requireRunsc(t)
	t.Cleanup(func() {
		for _, pid := range pidsNaming(dirs...) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		for _, dir := range dirs {
			roots, _ := filepath.Glob(filepath.Join(dir, "*", ".runsc"))
			for _, state := range append(roots, filepath.Join(dir, ".runsc")) {
				ids := map[string]bool{}
				entries, _ := os.ReadDir(state)
				for _, en := range entries {
					if i := strings.IndexAny(en.Name(), "._"); i > 0 {
						ids[en.Name()[:i]] = true
					}
				}
				for id := range ids {
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					_ = exec.CommandContext(ctx, runscBin, "--root", state, "delete", "--force", id).Run()
					cancel()
				}
				for i := 0; i < 64 && unix.Unmount(filepath.Join(state, "null-netns"), unix.MNT_DETACH) == nil; i++ {
				}
			}
		}
	})
}

// bufLogger logs to a buffer that is printed when the test fails. Unlike zaptest's logger it may
// be written after the test has ended (a watcher that today's library leaves behind) without
// panicking.
func bufLogger(t *testing.T) *zap.Logger {
	var buf syncBuffer
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("library log:\n%s", buf.String())
		}
	})
	enc := zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig())
	return zap.New(zapcore.NewCore(enc, zapcore.AddSync(&buf), zapcore.DebugLevel))
}

// newBackend is another Backend on root — a restarted supervisor, an operator's tool — closed at
// cleanup.
func newBackend(t *testing.T, root string, opts ...gvisor.Option) *gvisor.Backend {
	t.Helper()
	b, err := gvisor.New(append([]gvisor.Option{gvisor.WithBundleRoot(root), gvisor.WithLogger(bufLogger(t))}, opts...)...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	return b
}

// newEnvAt is newRealEnv on a bundle root of the test's choosing.
func newEnvAt(t *testing.T, root string, opts ...gvisor.Option) (e *realEnv) {
	t.Helper()
	t.Cleanup(func() { // e is set below; this runs after Close
		if e != nil {
			e.assertNothingLeft()
		}
	})
	e, err := envAt(t, root, opts...)
	require.NoError(t, err)
	return e
}

// envAt is newEnvAt without the check that nothing is left, for a root that holds what the
// attacker made too; the error is New's.
func envAt(t *testing.T, root string, opts ...gvisor.Option) (*realEnv, error) {
	t.Helper()
	requireRunsc(t)
	e := &realEnv{t: t, root: root, outs: map[string]*outPair{}}
	opts = append([]gvisor.Option{
		gvisor.WithBundleRoot(root),
		gvisor.WithLogger(bufLogger(t)),
		gvisor.WithOutput(func(id string) (io.Writer, io.Writer) {
			e.mu.Lock()
			defer e.mu.Unlock()
			p := &outPair{}
			e.outs[id] = p
			return &p.stdout, &p.stderr
		}),
	}, opts...)
	b, err := gvisor.New(opts...)
	if err != nil {
		return nil, err
	}
	e.b = b
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	return e, nil
}

// createRefused creates d, which the library must refuse, and returns the error. A cell that
// today's library creates anyway is destroyed at cleanup.
func createRefused(t *testing.T, b *gvisor.Backend, d *cellos.ExecutionCellDocument) error {
	t.Helper()
	h, err := b.Create(context.Background(), d)
	if err == nil {
		t.Cleanup(func() { _, _ = b.Destroy(context.Background(), h) })
	}
	return err
}

// assertRefusedDir checks a refusal of a directory: ErrHost, and a message naming the directory
// and the reason.
func assertRefusedDir(t *testing.T, err error, dir, reason string, msgAndArgs ...any) {
	t.Helper()
	if !assert.Error(t, err, msgAndArgs...) {
		return
	}
	assert.ErrorIs(t, err, cellos.ErrHost, msgAndArgs...)
	assert.Contains(t, err.Error(), dir, msgAndArgs...)
	assert.Contains(t, err.Error(), reason, msgAndArgs...)
}

// assertFieldRefused checks a document refusal: ErrInvalidSpec naming field.
func assertFieldRefused(t *testing.T, err error, field string, msgAndArgs ...any) {
	t.Helper()
	if assert.Error(t, err, msgAndArgs...) {
		assert.ErrorIs(t, err, cellos.ErrInvalidSpec, msgAndArgs...)
		assert.Contains(t, cellos.Fields(err), field, msgAndArgs...)
	}
}

// assertRunning checks that a cell still runs: an Exec in it works, and it has not exited.
func assertRunning(t *testing.T, e *realEnv, id string) {
	t.Helper()
	st, out, stderr, err := e.execIn(id, argv("/bin/echo", "ok"))
	if assert.NoError(t, err, "exec in %s", id) {
		assert.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st, "exec in %s: %s", id, stderr)
		assert.Equal(t, "ok\n", out, "exec in %s", id)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err = e.b.WaitForExit(ctx, id)
	assert.ErrorIs(t, err, context.DeadlineExceeded, "%s exited: %+v", id, st)
}

// rewriteJSON changes a JSON file of a bundle in place, as a process running as root could.
func rewriteJSON(t *testing.T, path string, change func(m map[string]any)) {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	m := map[string]any{}
	require.NoError(t, json.Unmarshal(data, &m))
	change(m)
	writeJSONFile(t, path, m)
}

func writeJSONFile(t *testing.T, path string, v any) {
	t.Helper()
	data, err := json.Marshal(v)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, data, 0o644))
}

// cgroupDir is the directory of a cgroup path in a controller's v1 hierarchy, or in the unified
// hierarchy on a v2 host.
func cgroupDir(controller, path string) string {
	if fi, err := os.Stat("/sys/fs/cgroup/" + controller); err == nil && fi.IsDir() {
		return "/sys/fs/cgroup/" + controller + path
	}
	return "/sys/fs/cgroup" + path
}

// removeCgroups removes a cell's cgroups in every hierarchy, as a reboot does. Its processes must
// be gone.
func removeCgroups(t *testing.T, path string) {
	t.Helper()
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*" + path)
	dirs = append(dirs, "/sys/fs/cgroup"+path)
	var rm func(dir string) error
	rm = func(dir string) error {
		entries, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		for _, en := range entries {
			if en.IsDir() {
				if err := rm(filepath.Join(dir, en.Name())); err != nil {
					return err
				}
			}
		}
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			err := syscall.Rmdir(dir)
			if err == nil || errors.Is(err, syscall.ENOENT) {
				return nil
			}
			if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
				return err
			}
		}
	}
	for _, d := range dirs {
		require.NoError(t, rm(d))
	}
}

// killCell SIGKILLs every host process of a cell — its shim, runsc, the sandbox, its gofer — as a
// power cut would, and waits until they are gone.
func killCell(t *testing.T, bundle, runscID, cgroupPath string) {
	t.Helper()
	find := func() []int {
		pids := pidsNaming(bundle, runscID)
		data, _ := os.ReadFile(filepath.Join(cgroupDir("memory", cgroupPath), "cgroup.procs"))
		for _, f := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return pids
	}
	require.NotEmpty(t, find(), "no process of the cell found")
	require.Eventually(t, func() bool {
		pids := find()
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		return len(pids) == 0
	}, 30*time.Second, 50*time.Millisecond, "processes of the cell: %v", processesNaming(bundle, runscID))
}

// procStart is a process's start time (field 22 of /proc/<pid>/stat), as shim.pid records it.
func procStart(t *testing.T, pid int) uint64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	require.NoError(t, err)
	fields := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	start, err := strconv.ParseUint(fields[19], 10, 64)
	require.NoError(t, err)
	return start
}

// alive reports whether pid runs (and is not a zombie).
func alive(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	fields := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	return len(fields) > 0 && fields[0] != "Z" && fields[0] != "X"
}

// isMountPoint reports whether something is mounted on dir.
func isMountPoint(dir string) bool {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	for line := range strings.Lines(string(data)) {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return hex.EncodeToString(b)
}

// Finding 1: a pool keeper's record planted by another user in a bundle root it created names
// the runsc binary that Recover runs, as root.
func TestSecurityPlantedKeeperRecordNotRun(t *testing.T) {
	t.Parallel()
	requireRunsc(t)
	requireRoot(t)
	sticky := stickyDir(t)
	root := filepath.Join(sticky, "cellos-gvisor")
	staged, marker := stageEvil(t)
	name := randomHex(t, 12) // a pool directory's name: 24 hex digits
	keeper := filepath.Join(publicDir(t), "keeper.json")
	evil := filepath.Join(sticky, "evil-runsc")
	writeJSONFile(t, keeper, map[string]any{"runsc": map[string]any{"Path": evil, "Root": filepath.Join(root, ".runsc")}})
	require.NoError(t, os.Chmod(keeper, 0o644))
	// The attacker gets there first: the bundle root, an idle pool sandbox's record naming its
	// program, and runsc state for that sandbox, which makes Recover delete it.
	asAttacker(t, fmt.Sprintf(`cp %[1]s %[2]s; chmod 755 %[2]s
mkdir -p %[3]s/.pool/%[4]s %[3]s/.runsc
cp %[5]s %[3]s/.pool/%[4]s/keeper.json
: > %[3]s/.runsc/cellos-pool-%[4]s.state`, shq(staged), shq(evil), shq(root), name, shq(keeper)))
	before := listTree(sticky)

	b, err := gvisor.New(gvisor.WithBundleRoot(root), gvisor.WithLogger(bufLogger(t)))
	if err == nil {
		t.Cleanup(func() { _ = b.Close(context.Background()) })
		_, err = b.Recover(context.Background())
	}
	assertEvilNeverRan(t, marker)
	assertRefusedDir(t, err, root, fmt.Sprintf("owned by uid %d", nobody))
	assertTreeUnchanged(t, sticky, before, "nothing may be written in a refused root")
}

// Finding 2: the bundle root's parent belongs to the attacker, who can then replace the root or a
// bundle at any moment.
func TestSecurityAttackerOwnedParent(t *testing.T) {
	requireRunsc(t)
	requireRoot(t)
	t.Run("refused", func(t *testing.T) {
		parent := filepath.Join(stickyDir(t), "attacker")
		asAttacker(t, "mkdir "+shq(parent))
		root := filepath.Join(parent, "cellos-gvisor")
		before := listTree(parent)
		b, err := gvisor.New(gvisor.WithBundleRoot(root), gvisor.WithLogger(bufLogger(t)))
		if err == nil {
			t.Cleanup(func() { _ = b.Close(context.Background()) })
			err = createRefused(t, b, sh("under-attacker", "true"))
		}
		assertRefusedDir(t, err, parent, fmt.Sprintf("owned by uid %d", nobody))
		if err != nil {
			assert.Contains(t, strings.ReplaceAll(err.Error(), root, ""), parent, "the error names the parent, not only the root")
		}
		assertTreeUnchanged(t, parent, before, "nothing may be written under the attacker's directory")
	})

	// While Creates run, the attacker swaps the bundle being created with a directory of its own
	// whose shim.json names the attacker's program (exchangeLoop).
	t.Run("race", func(t *testing.T) {
		const id, rounds, budget = "swapped", 200, 10 * time.Second
		bin := attackerBinary(t)
		staged, marker := stageEvil(t)
		parent := filepath.Join(stickyDir(t), "attacker")
		// The attacker's directory is beside the bundle: moving the bundle (root's, 0700) to
		// another directory would need write permission on it (its ".." changes).
		root, evil := filepath.Join(parent, "cellos-gvisor"), filepath.Join(parent, "evil-runsc")
		mine := filepath.Join(root, ".own-"+id)
		asAttacker(t, fmt.Sprintf("mkdir %s %s; cp %s %s; chmod 755 %[4]s", shq(parent), shq(root), shq(staged), shq(evil)))
		sweep(t, parent)
		shimJSON, err := json.Marshal(map[string]any{"cellId": id, "runscId": gvisor.RunscID(root, id), "outputCap": 1024,
			"runsc": map[string]any{"Path": evil, "Root": filepath.Join(parent, "state")}, "flags": map[string]any{"IgnoreCgroups": true}})
		require.NoError(t, err)

		e, err := envAt(t, root)
		if err != nil { // New refuses the root: so would every Create
			assertRefusedDir(t, err, parent, fmt.Sprintf("owned by uid %d", nobody), "New")
			return
		}
		stop := filepath.Join(parent, "stop") // the test writes it as root, the attacker sees it
		attacker := attackerCommand(bin, nobody, "exchange", filepath.Join(root, id), mine, string(shimJSON), (budget + 5*time.Second).String(), stop)
		var attackerOut bytes.Buffer
		attacker.Stdout, attacker.Stderr = &attackerOut, &attackerOut
		require.NoError(t, attacker.Start())
		t.Cleanup(func() {
			_ = attacker.Process.Kill()
			_ = attacker.Wait()
		})

		var refused, ran int
		var violations []string
		ctx := context.Background()
		for i, end := 0, time.Now().Add(budget); i < rounds && time.Now().Before(end); i++ {
			want := fmt.Sprintf("really ran %d\n", i)
			cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
			h, err := e.b.Create(cctx, sh(id, "echo really ran "+strconv.Itoa(i)))
			cancel()
			if err != nil {
				refused++
				if i == 0 {
					t.Logf("create %d: %v", i, err)
				}
				continue
			}
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			st, err := e.b.WaitForExit(wctx, id)
			cancel()
			if out := e.out(id).stdout.String(); err != nil || st != (cellos.ExitStatus{Reason: cellos.ExitExited}) || out != want {
				violations = append(violations, fmt.Sprintf("create %d succeeded, but the cell did not run: status %+v, error %v, stdout %q", i, st, err, out))
			} else {
				ran++
			}
			if rep, err := e.b.Destroy(ctx, h); err != nil || !rep.Destroyed {
				t.Logf("destroy %d: %+v %v", i, rep, err)
			}
		}
		require.NoError(t, os.WriteFile(stop, nil, 0o644))
		_ = attacker.Wait()
		t.Logf("creates refused %d, ran %d, went wrong %d; attacker: %s", refused, ran, len(violations), strings.TrimSpace(attackerOut.String()))
		_, _ = e.b.Destroy(ctx, cellos.CellHandle{CellID: id})
		assertEvilNeverRan(t, marker)
		assert.Equal(t, 0, len(violations), "creates that went wrong, the first: %s", strings.Join(violations[:min(3, len(violations))], "; "))
	})
}

// runVictim is a directory under /run with a file, a small tmpfs mounted on it and a file on
// that; removed at cleanup.
func runVictim(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/run", "cellos-sectest-victim-")
	require.NoError(t, err)
	t.Cleanup(func() {
		for i := 0; i < 16 && unix.Unmount(dir, unix.MNT_DETACH) == nil; i++ {
		}
		_ = os.RemoveAll(dir)
	})
	require.NoError(t, os.WriteFile(filepath.Join(dir, "under"), []byte("under the mount"), 0o644))
	require.NoError(t, unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "precious"), []byte("keep me"), 0o644))
	return dir
}

// Finding 3: what a bundle's net.json names is torn down; a document may bind the bundle root
// writable into a cell that runs as root.
func TestSecurityNetRecordAndHostileDocument(t *testing.T) {
	t.Parallel()
	requireRoot(t)
	t.Run("forged net.json", func(t *testing.T) {
		e := newRealEnv(t)
		victim := runVictim(t)
		name := "../../run/" + filepath.Base(victim)
		require.Equal(t, victim, filepath.Join("/run/netns", name), "the forged namespace name resolves to the victim")
		h := e.create(sh("net-forged", "echo up; sleep 60"))
		e.waitOutput(h.CellID, hasLine("up"))
		writeJSONFile(t, filepath.Join(e.root, h.CellID, "net.json"), map[string]any{"mode": "sandbox", "name": name})

		rep, err := newBackend(t, e.root).Destroy(context.Background(), h) // a restarted supervisor, or cellrun destroy
		assert.NoError(t, err)
		assert.True(t, rep.Destroyed, "%+v", rep)
		assert.True(t, isMountPoint(victim), "Destroy unmounted %s, which a forged net.json named", victim)
		data, err := os.ReadFile(filepath.Join(victim, "precious"))
		assert.NoError(t, err)
		assert.Equal(t, "keep me", string(data))
	})

	t.Run("root with a writable bind of the bundle root", func(t *testing.T) {
		hostile := func(root string) *cellos.ExecutionCellDocument {
			d := sh("hostile", "true")
			d.Spec.Run.User = &cellos.UserSpec{UID: 0, GID: 0}
			writable := false
			d.Spec.Mounts = []cellos.MountSpec{{Type: cellos.MountBind, Source: root, Destination: "/b", ReadOnly: &writable}}
			return d
		}
		e := newRealEnv(t)
		before := listTree(e.root)
		err := createRefused(t, e.b, hostile(e.root))
		assertFieldRefused(t, err, "spec.run.user")
		assertFieldRefused(t, err, "spec.mounts[0].source")
		assertTreeUnchanged(t, e.root, before, "nothing may be written for a refused document")

		allowed := newRealEnv(t, optAllowRoot(true)...)
		before = listTree(allowed.root)
		err = createRefused(t, allowed.b, hostile(allowed.root))
		assertFieldRefused(t, err, "spec.mounts[0].source", "WithAllowRoot(true) allows uid 0, never the bind")
		assert.NotContains(t, cellos.Fields(err), "spec.run.user", "WithAllowRoot(true)")
		assertTreeUnchanged(t, allowed.root, before, "nothing may be written for a refused document")
	})
}

// Finding 4: a bundle root that is a symlink the attacker planted: Recover (and Destroy) remove
// the "bundles" of whatever it points at.
func TestSecuritySymlinkedBundleRoot(t *testing.T) {
	t.Parallel()
	requireRunsc(t)
	requireRoot(t)
	sticky := stickyDir(t)
	target := filepath.Join(t.TempDir(), "host") // stands for / : root's directories
	for _, sub := range []string{"etc", "home", "srv"} {
		require.NoError(t, os.MkdirAll(filepath.Join(target, sub), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(target, sub, "precious"), []byte(sub), 0o644))
	}
	root := filepath.Join(sticky, "cellos-gvisor")
	asAttacker(t, fmt.Sprintf("ln -s %s %s", shq(target), shq(root)))
	before, beforeSticky := listTree(target), listTree(sticky)

	b, err := gvisor.New(gvisor.WithBundleRoot(root), gvisor.WithLogger(bufLogger(t)))
	if err != nil {
		assertRefusedDir(t, err, root, "symlink", "New")
	} else {
		t.Cleanup(func() { _ = b.Close(context.Background()) })
		ctx := context.Background()
		rep, err := b.Recover(ctx)
		assertRefusedDir(t, err, root, "symlink", "Recover (report %+v)", rep)
		cells, err := b.List(ctx)
		assertRefusedDir(t, err, root, "symlink", "List (%+v)", cells)
		_, err = b.Attach(ctx, "srv")
		assertRefusedDir(t, err, root, "symlink", "Attach")
		_, err = b.Destroy(ctx, cellos.CellHandle{CellID: "home"})
		assertRefusedDir(t, err, root, "symlink", "Destroy")
	}
	assertTreeUnchanged(t, target, before, "the symlink's target must be left as it was")
	assertTreeUnchanged(t, sticky, beforeSticky)
}

// rawSandbox is a sandbox the test starts with runsc itself, outside the library, as anyone
// with runsc would.
type rawSandbox struct{ id, state string }

func startRawSandbox(t *testing.T, runscBin string, b *gvisor.Backend) rawSandbox {
	t.Helper()
	dir := t.TempDir()
	bundle, state := filepath.Join(dir, "bundle"), filepath.Join(dir, "state")
	rootfs := filepath.Join(bundle, "rootfs")
	require.NoError(t, os.MkdirAll(filepath.Join(rootfs, "etc"), 0o755))
	require.NoError(t, os.Mkdir(state, 0o700))
	for _, h := range gvisor.ProbeHostSystem() {
		if h.Symlink != "" {
			require.NoError(t, os.Symlink(h.Symlink, filepath.Join(rootfs, h.Path)))
		}
	}
	cfg, err := b.Config(doc("raw", "/bin/sleep", "60"))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(bundle, "config.json"), cfg, 0o644))
	// The sandbox inherits runsc's stdio: a file, so that nothing waits for it to close.
	log, err := os.Create(filepath.Join(dir, "runsc.out"))
	require.NoError(t, err)
	defer log.Close()
	raw := rawSandbox{id: "cellos-sectest-raw-" + randomHex(t, 8), state: state}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, runscBin, "--root", state, "--network=none", "--ignore-cgroups", "run", "--detach", "--bundle", bundle, raw.id)
	cmd.Dir, cmd.Stdout, cmd.Stderr = bundle, log, log
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = exec.CommandContext(ctx, runscBin, "--root", state, "delete", "--force", raw.id).Run()
		for i := 0; i < 64 && unix.Unmount(filepath.Join(state, "null-netns"), unix.MNT_DETACH) == nil; i++ {
		}
	})
	if err := cmd.Run(); err != nil {
		out, _ := os.ReadFile(log.Name())
		t.Fatalf("runsc run --detach: %v: %s", err, out)
	}
	return raw
}

// controlSocketNames are the abstract addresses a sandbox's controller may listen on: runsc
// binds @runsc-sandbox.<id>, and Debian's (built with an older Go) binds it with a trailing NUL,
// which is then part of the name.
func controlSocketNames(runscID string) []string {
	return []string{"@runsc-sandbox." + runscID, "@runsc-sandbox." + runscID + "\x00"}
}

// Finding 5: Debian's runsc listens for a sandbox's control commands on an abstract unix socket
// of the caller's network namespace, which every local user can connect to.
func TestSecurityControlSocketUnreachable(t *testing.T) {
	t.Parallel()
	runscBin := requireRunsc(t)
	requireRoot(t)
	bin := attackerBinary(t)
	e := newRealEnv(t)
	h := e.create(sh("ctl", "echo up; sleep 60"))
	e.waitOutput(h.CellID, hasLine("up"))
	runscID := gvisor.RunscID(e.root, h.CellID)
	raw := startRawSandbox(t, runscBin, e.b)

	if _, err := os.Stat(filepath.Join(raw.state, "runsc-"+raw.id+".sock")); err == nil {
		// A current runsc: the controller is a file socket in the state root (0700).
		sock := filepath.Join(e.root, ".runsc", "runsc-"+runscID+".sock")
		_, err := os.Stat(sock)
		require.NoError(t, err, "the cell's control socket")
		res := runAttacker(t, bin, otherUser, "connect", append([]string{sock}, controlSocketNames(runscID)...)...)
		assert.Equal(t, []string{"EACCES", "ECONNREFUSED", "ECONNREFUSED"}, res, "uid %d connecting to the cell's sandbox controller", otherUser)
		return
	}
	res := runAttacker(t, bin, otherUser, "connect", controlSocketNames(raw.id)...)
	require.Contains(t, res, "connected", "uid %d reaches the controller of a sandbox started by root in the host's network namespace (the probe works)", otherUser)
	res = runAttacker(t, bin, otherUser, "connect", controlSocketNames(runscID)...)
	assert.Equal(t, []string{"ECONNREFUSED", "ECONNREFUSED"}, res, "uid %d connecting to the sandbox controller of the library's cell", otherUser)
}

// Finding 6: cgroups named after the cell id clash between bundle roots.
func TestSecuritySameIDOtherRootCgroups(t *testing.T) {
	requireRoot(t)
	limited := func(id string) *cellos.ExecutionCellDocument {
		d := sh(id, "echo up; sleep 60")
		d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 256 << 20}
		return d
	}
	t.Run("both run", func(t *testing.T) {
		a, b := newRealEnv(t), newRealEnv(t)
		ha := a.create(limited("same-id"))
		hb, err := b.b.Create(context.Background(), limited("same-id"))
		require.NoError(t, err, "a cell of the same id in another bundle root")
		t.Cleanup(func() { b.destroy(hb) })
		require.NotNil(t, ha.CgroupPath)
		require.NotNil(t, hb.CgroupPath)
		assert.NotEqual(t, *ha.CgroupPath, *hb.CgroupPath)
		a.waitOutput(ha.CellID, hasLine("up"))
		b.waitOutput(hb.CellID, hasLine("up"))
		a.destroy(ha)
		assertRunning(t, b, hb.CellID)
		assert.DirExists(t, cgroupDir("memory", *hb.CgroupPath))
	})

	// A supervisor on root A is killed with its cell (a power cut); its bundle stays. After the
	// reboot a cell of the same id runs on root B; then A's supervisor starts again and recovers.
	t.Run("after a reboot", func(t *testing.T) {
		a, b := newRealEnv(t), newRealEnv(t)
		ha := a.create(limited("reboot-id"))
		require.NotNil(t, ha.CgroupPath)
		a.waitOutput(ha.CellID, hasLine("up"))
		killCell(t, filepath.Join(a.root, ha.CellID), gvisor.RunscID(a.root, ha.CellID), *ha.CgroupPath)
		removeCgroups(t, *ha.CgroupPath)

		hb := b.create(limited("reboot-id"))
		require.NotNil(t, hb.CgroupPath)
		b.waitOutput(hb.CellID, hasLine("up"))
		rep, err := newBackend(t, a.root).Recover(context.Background())
		assert.NoError(t, err)
		assert.Equal(t, []string{"reboot-id"}, rep.Cleaned)
		assertRunning(t, b, hb.CellID)
		assert.DirExists(t, cgroupDir("memory", *hb.CgroupPath))
	})
}

// Finding 7: a full bundle root loses the exit status of every cell that ends meanwhile.
func TestSecurityFullDiskKeepsExitStatus(t *testing.T) {
	requireRunsc(t)
	root := mountTmpfs(t, "32m,mode=0711", 0) // mountTmpfs puts "size=" in front
	// runsc's state is elsewhere: a cell's container state, removed as it exits, would otherwise
	// free just the room its exit record needs.
	state := t.TempDir()
	e := newEnvAt(t, root, append(optMinFreeSpace(1<<20), gvisor.WithOutputCap(1<<30), gvisor.WithStateRoot(state))...)
	quiet := e.create(sh("quiet", `trap 'exit 0' TERM; while :; do sleep 0.2; done`))
	chatty := sh("chatty", "exec yes")
	chatty.Spec.Lifetime = &cellos.LifetimeSpec{TTLSeconds: 5}
	e.create(chatty)
	free := func() uint64 {
		var st unix.Statfs_t
		if err := unix.Statfs(root, &st); err != nil {
			return 1 << 62
		}
		return st.Bavail * uint64(st.Bsize)
	}
	require.Eventually(t, func() bool { return free() < 64<<10 }, 60*time.Second, 20*time.Millisecond, "the chatty cell fills the bundle root (%d bytes free)", free())

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	require.NoError(t, e.b.Signal(ctx, quiet.CellID, syscall.SIGTERM))
	st, err := e.b.WaitForExit(ctx, quiet.CellID)
	assert.NoError(t, err, "the quiet cell's exit on a full disk")
	assert.Equal(t, cellos.ExitStatus{Code: 0, Reason: cellos.ExitExited}, st)
	st, err = e.b.WaitForExit(ctx, "chatty")
	assert.NoError(t, err, "the chatty cell's exit on a full disk")
	assert.Equal(t, cellos.ExitDeadlineExceeded, st.Reason)

	// Last: a Create that today's library starts frees what it wrote when it fails.
	err = createRefused(t, e.b, sh("late", "true"))
	if assert.Error(t, err, "Create on a full bundle root") {
		assert.ErrorIs(t, err, cellos.ErrHost)
		assert.Regexp(t, `(?i)free`, err.Error())
	}
	assert.NoFileExists(t, filepath.Join(root, "late"))
}

// Bundle and state roots that exist already are refused, with nothing written, unless they are
// the library's own kind of directory.
func TestSecurityPrecreatedRootsRefused(t *testing.T) {
	t.Parallel()
	requireRunsc(t)
	requireRoot(t)
	bad := []struct {
		name   string
		reason string
		make   func(t *testing.T, dir string)
	}{
		{"owned by nobody", fmt.Sprintf("owned by uid %d", nobody), func(t *testing.T, dir string) {
			require.NoError(t, os.Mkdir(dir, 0o755))
			require.NoError(t, os.Chown(dir, nobody, nobody))
		}},
		{"mode 0777", "writable", func(t *testing.T, dir string) {
			require.NoError(t, os.Mkdir(dir, 0o755))
			require.NoError(t, os.Chmod(dir, 0o777))
		}},
		{"symlink", "symlink", func(t *testing.T, dir string) {
			target := filepath.Join(filepath.Dir(dir), "target")
			require.NoError(t, os.Mkdir(target, 0o700))
			require.NoError(t, os.Symlink(target, dir))
		}},
	}
	for _, which := range []string{"bundle root", "state root"} {
		for _, c := range bad {
			t.Run(which+"/"+c.name, func(t *testing.T) {
				parent := t.TempDir()
				require.NoError(t, os.Chmod(parent, 0o755))
				dir := filepath.Join(parent, "root")
				c.make(t, dir)
				opts := []gvisor.Option{gvisor.WithBundleRoot(dir)}
				if which == "state root" {
					opts = []gvisor.Option{gvisor.WithBundleRoot(filepath.Join(parent, "bundles")), gvisor.WithStateRoot(dir)}
				}
				before := listTree(parent)
				b, err := gvisor.New(append(opts, gvisor.WithLogger(bufLogger(t)))...)
				if err == nil {
					t.Cleanup(func() { _ = b.Close(context.Background()) })
					err = createRefused(t, b, sh("precreated", "true"))
				}
				assertRefusedDir(t, err, dir, c.reason)
				assertTreeUnchanged(t, parent, before, "nothing may be written")
				assert.Empty(t, processesNaming(parent), "no runsc may run")
			})
		}
	}
}

// Records a live cell's bundle holds, forged (by a process running as root, as a compromised or
// buggy program would): none of them may reach outside the bundle.
func TestSecurityForgedBundleRecords(t *testing.T) {
	t.Parallel()
	requireRoot(t)
	ctx := context.Background()

	t.Run("shim.json names another runsc", func(t *testing.T) {
		e := newRealEnv(t)
		sweep(t, e.root)
		evil, marker := stageEvil(t)
		h := e.create(sh("shim-forged", "echo up; sleep 60"))
		e.waitOutput(h.CellID, hasLine("up"))
		rewriteJSON(t, filepath.Join(e.root, h.CellID, "shim.json"), func(m map[string]any) {
			m["runsc"].(map[string]any)["Path"] = evil
		})
		op := newBackend(t, e.root)
		_, err := op.Attach(ctx, h.CellID)
		require.NoError(t, err)
		var stdout bytes.Buffer
		ectx, cancel := context.WithTimeout(ctx, 30*time.Second)
		st, err := op.Exec(ectx, h.CellID, argv("/bin/echo", "ok"), &stdout, nil)
		cancel()
		assert.NoError(t, err, "exec")
		assert.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st)
		assert.Equal(t, "ok\n", stdout.String())
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err = op.Stats(sctx, h.CellID)
		cancel()
		assert.NoError(t, err, "stats")
		rep, err := op.Destroy(ctx, h)
		assert.NoError(t, err, "destroy")
		assert.True(t, rep.Destroyed)
		assertEvilNeverRan(t, marker)
	})

	// shim.pid names an unrelated process of root's: a plain one, and one whose command line is a
	// pool keeper's — any program chooses its own — with a shim.json that names it as the keeper.
	for _, c := range []struct{ name, argv0, keeper string }{
		{"shim.pid names an unrelated process", "sleep", ""},
		{"shim.pid and shim.json name a process that looks like a keeper", "cellos-gvisor-pool", "60"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newRealEnv(t)
			sweep(t, e.root)
			h := e.create(sh("pid-forged", "echo up; sleep 60"))
			e.waitOutput(h.CellID, hasLine("up"))
			victim := &exec.Cmd{Path: "/bin/sleep", Args: []string{c.argv0, "60"}, SysProcAttr: &syscall.SysProcAttr{Setpgid: true}}
			require.NoError(t, victim.Start())
			t.Cleanup(func() {
				_ = victim.Process.Kill()
				_ = victim.Wait()
			})
			pid := victim.Process.Pid
			bundle := filepath.Join(e.root, h.CellID)
			writeJSONFile(t, filepath.Join(bundle, "shim.pid"), map[string]any{"pid": pid, "start": procStart(t, pid)})
			if c.keeper != "" {
				rewriteJSON(t, filepath.Join(bundle, "shim.json"), func(m map[string]any) {
					m["pool"] = map[string]any{"keeper": c.keeper}
				})
			}
			op := newBackend(t, e.root)
			rep, err := op.Recover(ctx)
			t.Logf("recover: %+v %v", rep, err)
			assert.True(t, alive(pid), "Recover killed the process shim.pid named")
			drep, err := op.Destroy(ctx, h)
			t.Logf("destroy: %+v %v", drep, err)
			assert.True(t, alive(pid), "Destroy killed the process shim.pid named")
		})
	}

	t.Run("config.json names another cell's cgroups", func(t *testing.T) {
		e := newRealEnv(t)
		victim := sh("cg-victim", "echo up; sleep 60")
		victim.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 256 << 20}
		hv := e.create(victim)
		require.NotNil(t, hv.CgroupPath)
		hf := e.create(sh("cg-forged", "echo up; sleep 60"))
		e.waitOutput(hv.CellID, hasLine("up"))
		e.waitOutput(hf.CellID, hasLine("up"))
		rewriteJSON(t, filepath.Join(e.root, hf.CellID, "config.json"), func(m map[string]any) {
			m["linux"].(map[string]any)["cgroupsPath"] = *hv.CgroupPath
		})
		rep, err := newBackend(t, e.root).Destroy(ctx, hf)
		assert.NoError(t, err)
		assert.True(t, rep.Destroyed)
		assert.DirExists(t, cgroupDir("memory", *hv.CgroupPath), "the other cell's cgroups")
		assertRunning(t, e, hv.CellID)
	})

	t.Run("exit.json", func(t *testing.T) {
		shadow := func() string {
			data, err := os.ReadFile("/etc/shadow")
			require.NoError(t, err)
			sum := sha256.Sum256(data)
			return hex.EncodeToString(sum[:]) + " " + strings.Join(listTree("/etc/shadow"), "")
		}
		shadowBefore := shadow()
		e := newRealEnv(t)
		variants := []struct {
			id    string
			forge func(t *testing.T, path string)
		}{
			{"exit-symlink", func(t *testing.T, path string) {
				require.NoError(t, os.Remove(path))
				require.NoError(t, os.Symlink("/etc/shadow", path))
			}},
			{"exit-fifo", func(t *testing.T, path string) {
				require.NoError(t, os.Remove(path))
				require.NoError(t, unix.Mkfifo(path, 0o644))
				t.Cleanup(func() {
					// A reader blocked opening the FIFO (today's library) is let go: an open for
					// writing meets it, and the close gives it end of file.
					for range 10 {
						if fd, err := unix.Open(path, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0); err == nil {
							unix.Close(fd)
						}
						time.Sleep(50 * time.Millisecond)
					}
				})
			}},
			{"exit-huge", func(t *testing.T, path string) {
				// A valid record, padded to 100 MiB.
				f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
				require.NoError(t, err)
				_, err = f.Write(bytes.Repeat([]byte{' '}, 100<<20))
				require.NoError(t, err)
				require.NoError(t, f.Close())
			}},
			{"exit-other-owner", func(t *testing.T, path string) {
				require.NoError(t, os.Lchown(path, nobody, nobody))
			}},
		}
		for _, v := range variants {
			e.create(sh(v.id, "exit 3"))
			st, err := e.b.WaitForExit(ctx, v.id)
			require.NoError(t, err)
			require.Equal(t, 3, st.Code)
		}
		op := newBackend(t, e.root)
		for _, v := range variants {
			t.Cleanup(func() { _, _ = op.Destroy(context.Background(), cellos.CellHandle{CellID: v.id}) })
		}
		for _, v := range variants { // their cleanups run first: a FIFO is let go before the Destroys
			v.forge(t, filepath.Join(e.root, v.id, "exit.json"))
		}
		for _, v := range variants {
			_, err := op.Attach(ctx, v.id)
			if err == nil {
				wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				var st cellos.ExitStatus
				st, err = op.WaitForExit(wctx, v.id)
				cancel()
				assert.NotErrorIs(t, err, context.DeadlineExceeded, "%s: WaitForExit hangs", v.id)
				assert.Error(t, err, "%s: the forged record was taken for the cell's exit: %+v", v.id, st)
			}
			if err != nil {
				assert.Contains(t, err.Error(), "exit.json", v.id)
			}
		}
		assert.Equal(t, shadowBefore, shadow(), "/etc/shadow")
	})
}

// Bind sources that reach the library's own state or the host's kernel interfaces are refused;
// WithBindSources restricts them further.
func TestSecurityBindSourcesRefused(t *testing.T) {
	t.Parallel()
	requireRoot(t)
	e := newRealEnv(t)
	before := listTree(e.root)
	link := filepath.Join(t.TempDir(), "to-the-root")
	require.NoError(t, os.Symlink(e.root, link))
	bind := func(id, source string) *cellos.ExecutionCellDocument {
		d := sh(id, "cat /b/in")
		d.Spec.Mounts = []cellos.MountSpec{{Type: cellos.MountBind, Source: source, Destination: "/b"}}
		return d
	}
	for i, source := range []string{e.root, "/", "/run/netns", "/proc", link, filepath.Dir(e.root)} {
		err := createRefused(t, e.b, bind(fmt.Sprintf("bind-%d", i), source))
		assertFieldRefused(t, err, "spec.mounts[0].source", "bind source %s", source)
	}
	d := sh("rootfs-above", "true")
	d.Spec.Rootfs = &cellos.RootfsSpec{Path: filepath.Dir(e.root)}
	assertFieldRefused(t, createRefused(t, e.b, d), "spec.rootfs.path", "an image root above the bundle root")
	assertTreeUnchanged(t, e.root, before, "nothing may be written for refused documents")

	srv := t.TempDir() // stands for /srv
	for _, dir := range []string{"allowed/x", "other"} {
		require.NoError(t, os.MkdirAll(filepath.Join(srv, dir), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(srv, dir, "in"), []byte(dir+"\n"), 0o644))
	}
	r := newRealEnv(t, optBindSources(filepath.Join(srv, "allowed"))...)
	err := createRefused(t, r.b, bind("bind-other", filepath.Join(srv, "other")))
	assertFieldRefused(t, err, "spec.mounts[0].source", "outside WithBindSources")
	assert.Equal(t, "allowed/x\n", r.probe(bind("bind-allowed", filepath.Join(srv, "allowed", "x"))), "a bind source under WithBindSources")
}

// A document without resources gets the default limits: 1 GiB, one CPU, a /tmp of finite size.
func TestSecurityDefaultLimits(t *testing.T) {
	t.Parallel()
	requireRoot(t)
	e := newRealEnv(t)
	h := e.create(sh("defaults", `grep MemTotal /proc/meminfo; echo "nproc $(nproc)"; /bin/busybox df -k /tmp | tail -n 1`))
	st, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	out := e.out(h.CellID).stdout.String()
	require.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st, "stdout: %s\nstderr: %s", out, e.out(h.CellID).stderr.String())
	t.Logf("inside the cell:\n%s", out)
	ls := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, ls, 3, out)
	const maxKiB = (1 << 30) >> 10 * 105 / 100 // 1 GiB and 5%
	memKiB, err := strconv.ParseUint(strings.Fields(ls[0])[1], 10, 64)
	require.NoError(t, err, out)
	assert.LessOrEqual(t, memKiB, uint64(maxKiB), "MemTotal (KiB) inside a cell without resources")
	df := strings.Fields(ls[2])
	require.GreaterOrEqual(t, len(df), 2, out)
	tmpKiB, err := strconv.ParseUint(df[1], 10, 64)
	require.NoError(t, err, out)
	assert.Positive(t, tmpKiB)
	assert.LessOrEqual(t, tmpKiB, uint64(maxKiB), "the size of /tmp (KiB) inside a cell without resources")
	// runsc shows at least 2 CPUs whatever the quota (--cpu-num-from-quota), so the CPU limit is
	// read where it is enforced: the cell's cgroup.
	require.NotNil(t, h.CgroupPath, "a cell without resources has cgroups")
	read := func(controller, file string) string {
		data, err := os.ReadFile(filepath.Join(cgroupDir(controller, *h.CgroupPath), file))
		require.NoError(t, err)
		return strings.TrimSpace(string(data))
	}
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err == nil { // v1
		assert.Equal(t, strconv.Itoa(1<<30), read("memory", "memory.limit_in_bytes"))
		assert.Equal(t, read("cpu", "cpu.cfs_period_us"), read("cpu", "cpu.cfs_quota_us"), "one CPU: quota = period")
	} else {
		assert.Equal(t, strconv.Itoa(1<<30), read("memory", "memory.max"))
		quota, period, _ := strings.Cut(read("cpu", "cpu.max"), " ")
		assert.Equal(t, period, quota, "one CPU: quota = period")
	}
}
