package ctlns

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// mounted tells whether path is a mount point in this process's mount table.
func mounted(t testing.TB, path string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == path {
			return true
		}
	}
	return false
}

// threadsNS returns the network namespace of every thread of this process that differs from
// want, as "tid: net:[ino]".
func threadsNS(t testing.TB, want string) []string {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	var wrong []string
	for _, task := range tasks {
		link, err := os.Readlink(filepath.Join("/proc/self/task", task.Name(), "ns/net"))
		if err != nil {
			continue // the thread has exited meanwhile
		}
		if link != want {
			wrong = append(wrong, task.Name()+": "+link)
		}
	}
	return wrong
}

func TestCreateRemove(t *testing.T) {
	needRoot(t)
	host, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(t.TempDir(), "control.netns")
	if err := Create(pin); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Remove(pin) })
	if !mounted(t, pin) {
		t.Fatalf("%s is not a mount point after Create", pin)
	}
	id := nsID(t, pin)
	if id == host {
		t.Fatalf("the pin holds the host's namespace %s", id)
	}
	f, err := Open(pin)
	if err != nil {
		t.Fatalf("Open of a pin Create made: %v", err)
	}
	_ = f.Close()
	// The new namespace is empty: only loopback.
	var links string
	inNS(t, pin, func() error {
		b, err := os.ReadFile("/proc/thread-self/net/dev")
		links = string(b)
		return err
	})
	if n := strings.Count(links, ":"); n != 1 || !strings.Contains(links, "lo:") {
		t.Fatalf("the new namespace is not empty:\n%s", links)
	}
	// A second Create at the same path fails and leaves the first pin alone.
	if err := Create(pin); !errors.Is(err, os.ErrExist) {
		t.Fatalf("Create over an existing pin: %v, want ErrExist", err)
	}
	if !mounted(t, pin) || nsID(t, pin) != id {
		t.Fatal("a failed Create disturbed the existing pin")
	}
	if err := Remove(pin); err != nil {
		t.Fatal(err)
	}
	if mounted(t, pin) {
		t.Fatal("still mounted after Remove")
	}
	if _, err := os.Lstat(pin); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the pin file is left after Remove: %v", err)
	}
	if err := Remove(pin); err != nil {
		t.Fatalf("Remove of an absent pin: %v", err)
	}
	if wrong := threadsNS(t, host); len(wrong) > 0 {
		t.Fatalf("threads left in another namespace: %v", wrong)
	}
}

// Remove detaches every mount stacked on the pin, not just the top one.
func TestRemoveStacked(t *testing.T) {
	needRoot(t)
	pin := filepath.Join(t.TempDir(), "control.netns")
	if err := Create(pin); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Remove(pin) })
	for i := 0; i < 3; i++ {
		if err := unix.Mount("/proc/self/ns/net", pin, "", unix.MS_BIND, ""); err != nil {
			t.Fatal(err)
		}
	}
	if err := Remove(pin); err != nil {
		t.Fatal(err)
	}
	if mounted(t, pin) {
		t.Fatal("still mounted after Remove")
	}
}

// A user who may not make namespaces gets an error and leaves nothing behind.
func TestCreateUnprivileged(t *testing.T) {
	needRoot(t)
	dir := publicDir(t)
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(dir, "control.netns")
	out, err := helper("create", pin).CombinedOutput()
	if err == nil {
		t.Fatalf("Create as uid %d succeeded: %s", unprivileged, out)
	}
	if !bytes.Contains(out, []byte("operation not permitted")) {
		t.Fatalf("Create as uid %d: %v: %s, want EPERM", unprivileged, err, out)
	}
	if _, err := os.Lstat(pin); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a failed Create left %s: %v", pin, err)
	}
}

func TestOpenRefuses(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	pin := filepath.Join(dir, "control.netns")
	if err := Create(pin); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Remove(pin) })
	regular := filepath.Join(dir, "regular")
	if err := os.WriteFile(regular, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	uts := filepath.Join(dir, "uts.ns") // nsfs, but not a network namespace
	if err := os.WriteFile(uts, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("/proc/self/ns/uts", uts, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(uts, unix.MNT_DETACH) })
	link := filepath.Join(dir, "link")
	if err := os.Symlink(pin, link); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path string
		want error
	}{
		{regular, ErrNotNamespace},
		{dir, ErrNotNamespace},
		{uts, ErrNotNamespace},
		{"/proc/self/ns/net", unix.ELOOP}, // a magic link: pins only
		{link, unix.ELOOP},
		{filepath.Join(dir, "absent"), os.ErrNotExist},
	} {
		cmd := exec.Command("/bin/true")
		err := Start(cmd, c.path)
		if !errors.Is(err, c.want) {
			t.Errorf("Start in %s: %v, want %v", c.path, err, c.want)
		}
		if cmd.Process != nil {
			t.Errorf("Start in %s started the process", c.path)
			_ = cmd.Wait()
		}
	}
}

// startedIn starts readlink /proc/self/ns/net in the pin and returns what it printed.
func startedIn(pin string) (string, error) {
	cmd := exec.Command("/bin/readlink", "/proc/self/ns/net")
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := Run(cmd, pin); err != nil {
		return "", err
	}
	return strings.TrimSpace(out.String()), nil
}

func TestStart(t *testing.T) {
	needRoot(t)
	host, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(t.TempDir(), "control.netns")
	if err := Create(pin); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Remove(pin) })
	got, err := startedIn(pin)
	if err != nil {
		t.Fatal(err)
	}
	if want := nsID(t, pin); got != want {
		t.Fatalf("the process ran in %s, want the pin's %s (host %s)", got, want, host)
	}
	if wrong := threadsNS(t, host); len(wrong) > 0 {
		t.Fatalf("threads left in another namespace: %v", wrong)
	}
	// A process started plainly afterwards is in the host's namespace.
	out, err := exec.Command("/bin/readlink", "/proc/self/ns/net").Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != host {
		t.Fatalf("a plain process ran in %s, want the host's %s", got, host)
	}
}

// A process that fails to start reports its error, and the thread is back where it was.
func TestStartFailure(t *testing.T) {
	needRoot(t)
	host, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(t.TempDir(), "control.netns")
	if err := Create(pin); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Remove(pin) })
	if err := Start(exec.Command("/nonexistent/binary"), pin); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Start of a missing binary: %v, want ErrNotExist", err)
	}
	if wrong := threadsNS(t, host); len(wrong) > 0 {
		t.Fatalf("threads left in another namespace: %v", wrong)
	}
}

// Many goroutines at once each make a namespace, start a process in it and remove it; every
// process runs in its own namespace and afterwards every thread is in the original one.
func TestConcurrent(t *testing.T) {
	needRoot(t)
	host, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	const n = 20
	dir := t.TempDir()
	var wg sync.WaitGroup
	errs := make([]error, n)
	seen := make([]string, n)
	created := make([]string, n)
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			pin := filepath.Join(dir, fmt.Sprintf("ns-%d", i))
			if err := Create(pin); err != nil {
				errs[i] = err
				return
			}
			created[i] = pin
			var st unix.Stat_t
			if err := unix.Stat(pin, &st); err != nil {
				errs[i] = err
				return
			}
			got, err := startedIn(pin)
			if err != nil {
				errs[i] = err
				return
			}
			seen[i] = got
			if want := fmt.Sprintf("net:[%d]", st.Ino); got != want {
				errs[i] = fmt.Errorf("process %d ran in %s, want %s", i, got, want)
			}
		})
	}
	close(start)
	wg.Wait()
	// Removed only once all were seen: a removed namespace's inode number can be the next one's.
	for i, pin := range created {
		if pin == "" {
			continue
		}
		if err := Remove(pin); err != nil && errs[i] == nil {
			errs[i] = err
		}
	}
	for _, err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	distinct := map[string]bool{}
	for _, s := range seen {
		distinct[s] = true
	}
	if len(distinct) != n || distinct[host] {
		t.Errorf("processes ran in %d distinct namespaces (host among them: %v), want %d", len(distinct), distinct[host], n)
	}
	if wrong := threadsNS(t, host); len(wrong) > 0 {
		t.Fatalf("threads left in another namespace: %v", wrong)
	}
	tasks, _ := os.ReadDir("/proc/self/task")
	t.Logf("%d threads, all in %s", len(tasks), host)
}

// A directory holding a pin can be renamed (as a warm sandbox's directory becomes a cell's
// bundle): the mount moves with it and the namespace is the same.
func TestRenameKeepsPin(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	from := filepath.Join(dir, "pool-1")
	to := filepath.Join(dir, "cell-1")
	if err := os.Mkdir(from, 0o700); err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(from, "control.netns")
	if err := Create(pin); err != nil {
		t.Fatal(err)
	}
	moved := filepath.Join(to, "control.netns")
	t.Cleanup(func() { _ = Remove(pin); _ = Remove(moved) })
	id := nsID(t, pin)
	if err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE); err != nil {
		t.Fatal(err)
	}
	if mounted(t, pin) {
		t.Fatalf("%s is still a mount point after the rename", pin)
	}
	if !mounted(t, moved) {
		t.Fatalf("%s is not a mount point after the rename", moved)
	}
	if got := nsID(t, moved); got != id {
		t.Fatalf("after the rename the pin holds %s, want %s", got, id)
	}
	got, err := startedIn(moved)
	if err != nil {
		t.Fatal(err)
	}
	if got != id {
		t.Fatalf("a process started in the moved pin ran in %s, want %s", got, id)
	}
	if err := Remove(moved); err != nil {
		t.Fatal(err)
	}
	if mounted(t, moved) {
		t.Fatal("still mounted after Remove")
	}
}

func TestScanAbstract(t *testing.T) {
	const table = `Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 23456 @runsc-sandbox.abc@
0000000000000000: 00000003 00000000 00000000 0001 03 23459 @runsc-sandbox.abc@
0000000000000000: 00000002 00000000 00010000 0001 01 23460 @runsc-sandbox.xyz
0000000000000000: 00000002 00000000 00010000 0001 01 23457 /run/x.sock
0000000000000000: 00000003 00000000 00000000 0001 03 23458
`
	for name, want := range map[string][]string{
		"runsc-sandbox.abc": {"@runsc-sandbox.abc@"}, // with the NUL runsc counts, once
		"runsc-sandbox.xyz": {"@runsc-sandbox.xyz"},
		"runsc-sandbox.ab":  nil, // no prefix match
		"/run/x.sock":       nil, // a file socket is not abstract
		"":                  nil,
	} {
		got, err := scanAbstract(strings.NewReader(table), name)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("scanAbstract(%q) = %q, %v; want %q", name, got, err, want)
		}
	}
}
