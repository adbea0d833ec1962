package ctlns

// Tests against the real runsc ($CELLOS_GVISOR_RUNSC_BIN, else runsc on $PATH): where each
// version serves a sandbox's control socket, who can reach it, and where the sandbox itself
// ends up when its runsc command runs inside a pin.

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

func randomID(prefix string) string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// runDetached starts container id of bundle with r (run --detach) and arranges its removal.
func runDetached(t *testing.T, r *runscCLI, bundle, id string) {
	t.Helper()
	t.Cleanup(func() {
		if out, err := r.run("delete", "--force", id); err != nil {
			t.Logf("runsc delete --force %s: %v: %s", id, err, out)
		}
	})
	if out, err := r.run("run", "--detach", "--bundle", bundle, id); err != nil {
		t.Fatalf("runsc run --detach %s: %v: %s", id, err, out)
	}
}

// connect tries to connect to the abstract socket addr (as /proc/net/unix shows it: "@" for each
// NUL) as the unprivileged user, from the namespace pinned at pin ("" for the host's), and
// returns "connected" or the errno's name.
func connect(t *testing.T, addr, pin string) string {
	t.Helper()
	cmd := helper("connect", addr)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	var err error
	if pin != "" {
		err = Run(cmd, pin)
	} else {
		err = cmd.Run()
	}
	if err != nil {
		t.Fatalf("connect helper: %v: %s", err, out.String())
	}
	return strings.TrimSpace(out.String())
}

// socketFiles returns the Unix socket files under dir.
func socketFiles(dir string) []string {
	var socks []string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type()&os.ModeSocket != 0 {
			socks = append(socks, p)
		}
		return nil
	})
	return socks
}

// TestControlSocket starts a sandbox inside a pin and one outside, and checks who can reach
// their control sockets. With a runsc that serves abstract sockets, the pinned sandbox's
// socket is only in the pin and an unprivileged user in the host's namespace cannot connect,
// while the unpinned one's is open to that user; with a runsc that serves a file socket,
// neither is abstract. Either way every runsc command run inside the pin works.
func TestControlSocket(t *testing.T) {
	bin := runscBin(t)
	host := nsID(t, "/proc/thread-self/ns/net")
	dir := t.TempDir()
	bundle := filepath.Join(dir, "bundle")
	writeBundle(t, bundle, "", "/bin/sleep", "60")
	pin := filepath.Join(dir, "control.netns")
	if err := Create(pin); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := Remove(pin); err != nil {
			t.Error(err)
		}
	})
	r := newRunsc(t, bin, "--network=none", "--ignore-cgroups")
	inPin := r.in(pin)

	// The unpinned sandbox first: where its socket is tells which kind of runsc this is.
	open := randomID("ctlns-open-")
	runDetached(t, r, bundle, open)
	addrs, err := abstractAddrs(ControlSocket(open))
	if err != nil {
		t.Fatal(err)
	}
	abstract := len(addrs) > 0
	files := socketFiles(r.root)
	t.Logf("%s: abstract control socket %q; socket files in the state root: %v", bin, addrs, files)
	if !abstract && len(files) == 0 {
		t.Fatalf("found no control socket of %s: neither @%s nor a socket file in %s", open, ControlSocket(open), r.root)
	}
	// Both spellings of the address, with and without the trailing NUL runsc counts.
	spellings := func(id string) []string { return []string{"@" + ControlSocket(id), "@" + ControlSocket(id) + "@"} }
	for _, a := range spellings(open) {
		want := "ECONNREFUSED"
		if slices.Contains(addrs, a) {
			want = "connected"
		}
		if got := connect(t, a, ""); got != want {
			t.Fatalf("uid %d connecting to %q of the unpinned sandbox from the host's namespace: %s, want %s", unprivileged, a, got, want)
		}
	}
	// The probe finds what the unpinned sandbox shows.
	probeBundle := filepath.Join(publicDir(t), "bundle")
	writeBundle(t, probeBundle, "", "/bin/sleep", "60")
	start := time.Now()
	found, err := ProbeAbstract(testContext(), runner(bin, probeBundle), probeBundle)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ProbeAbstract as root: %v in %v", found, time.Since(start).Round(time.Millisecond))
	if found != abstract {
		t.Errorf("ProbeAbstract as root = %v, but the unpinned sandbox's socket is abstract: %v", found, abstract)
	}
	out, err := helper("probe", bin, probeBundle).CombinedOutput()
	if err != nil {
		t.Errorf("ProbeAbstract as uid %d: %v: %s", unprivileged, err, out)
	} else if got := strings.TrimSpace(string(out)); got != map[bool]string{true: "true", false: "false"}[abstract] {
		t.Errorf("ProbeAbstract as uid %d = %s, want %v", unprivileged, got, abstract)
	}

	// The pinned sandbox.
	id := randomID("ctlns-pinned-")
	runDetached(t, inPin, bundle, id)
	inHost, err := ServesAbstractSocket(id)
	if err != nil {
		t.Fatal(err)
	}
	if inHost {
		t.Fatalf("@%s of the sandbox started in the pin is in the host's namespace", ControlSocket(id))
	}
	var there bool
	inNS(t, pin, func() (err error) { there, err = ServesAbstractSocket(id); return err })
	if there != abstract {
		t.Fatalf("@%s in the pin's namespace: %v, want %v", ControlSocket(id), there, abstract)
	}
	for _, a := range spellings(id) {
		if got := connect(t, a, ""); got != "ECONNREFUSED" {
			t.Fatalf("uid %d connecting to %q of the pinned sandbox from the host's namespace: %s, want ECONNREFUSED", unprivileged, a, got)
		}
	}
	if abstract {
		// Inside the pin the socket is open to anyone, but only root can enter the pin.
		a := "@" + ControlSocket(id) + strings.TrimPrefix(addrs[0], "@"+ControlSocket(open))
		if got := connect(t, a, pin); got != "connected" {
			t.Fatalf("uid %d connecting to %q from inside the pin: %s, want connected", unprivileged, a, got)
		}
	}

	status, pid, err := inPin.state(id)
	if err != nil || status != "running" || pid <= 0 {
		t.Fatalf("runsc state in the pin: %q pid %d, %v; want running", status, pid, err)
	}
	sandboxNS := nsID(t, filepath.Join("/proc", strconv.Itoa(pid), "ns/net"))
	t.Logf("namespaces: host %s, pin %s, sandbox %s", host, nsID(t, pin), sandboxNS)
	if sandboxNS == host || sandboxNS == nsID(t, pin) {
		t.Errorf("with --network=none the sandbox is in %s, want a namespace of its own (host %s, pin %s)", sandboxNS, host, nsID(t, pin))
	}
	if out, err := inPin.run("ps", id); err != nil || !strings.Contains(out, "sleep") {
		t.Errorf("runsc ps in the pin: %v: %s", err, out)
	}
	if out, err := inPin.run("exec", "--user", "65534:65534", id, "/bin/echo", "hello"); err != nil || out != "hello" {
		t.Errorf("runsc exec in the pin: %v: %q", err, out)
	}

	// From the host's namespace.
	hostState, hostPid, hostStateErr := r.state(id)
	hostPs, hostPsErr := r.run("ps", id)
	hostExec, hostExecErr := r.run("exec", "--user", "65534:65534", id, "/bin/true")
	hostKill, hostKillErr := r.run("kill", id, "CONT") // harmless if it gets through
	t.Logf("from the host's namespace: state %q pid %d (%v); ps %v: %.200s; exec %v: %.200s; kill %v: %.200s",
		hostState, hostPid, hostStateErr, hostPsErr, hostPs, hostExecErr, hostExec, hostKillErr, hostKill)
	// Those commands did not disturb the container's record.
	if status, again, err := inPin.state(id); err != nil || status != "running" || again != pid {
		t.Errorf("after runsc from the host's namespace, state in the pin: %q pid %d, %v; want running pid %d", status, again, err, pid)
	}
	if abstract {
		if hostExecErr == nil || hostKillErr == nil {
			t.Errorf("runsc exec/kill of the pinned sandbox from the host's namespace worked (exec %v, kill %v); want them to fail", hostExecErr, hostKillErr)
		}
	} else if hostExecErr != nil || hostKillErr != nil || hostStateErr != nil || hostState != "running" {
		t.Errorf("with a file control socket, runsc from the host's namespace failed: state %q %v, exec %v, kill %v", hostState, hostStateErr, hostExecErr, hostKillErr)
	}

	if out, err := inPin.run("kill", id, "KILL"); err != nil {
		t.Fatalf("runsc kill in the pin: %v: %s", err, out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		status, _, err = inPin.state(id)
		if err == nil && status == "stopped" || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if status != "stopped" {
		t.Errorf("after kill KILL in the pin the sandbox is %q (%v), want stopped", status, err)
	}
	if out, err := inPin.run("delete", id); err != nil {
		t.Errorf("runsc delete in the pin: %v: %s", err, out)
	}
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err == nil {
		t.Errorf("the sandbox process %d is still there after delete", pid)
	}
}

// TestNetworkPath runs sandboxes whose OCI config names a network namespace, with the runsc
// command inside a pin: the sandbox must be in the config's namespace, not in the pin. A
// network mode that this runsc refuses is logged; at least one must work.
func TestNetworkPath(t *testing.T) {
	bin := runscBin(t)
	host := nsID(t, "/proc/thread-self/ns/net")
	dir := t.TempDir()
	pin := filepath.Join(dir, "control.netns")
	target := filepath.Join(dir, "cell.netns")
	for _, p := range []string{pin, target} {
		if err := Create(p); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = Remove(p) })
	}
	pinNS, targetNS := nsID(t, pin), nsID(t, target)
	t.Logf("namespaces: host %s, pin %s, config's %s", host, pinNS, targetNS)
	where := func(ns string) string {
		switch ns {
		case host:
			return "host"
		case pinNS:
			return "pin"
		case targetNS:
			return "config's"
		}
		return "own " + ns
	}
	worked := 0
	for _, c := range []struct {
		network string
		path    string
		want    string
	}{
		{"host", target, targetNS},
		{"sandbox", target, targetNS},
		{"host", "-", pinNS}, // no network namespace: the sandbox stays where runsc runs
	} {
		name := c.network + map[bool]string{true: "-path", false: "-nonetns"}[c.path != "-"]
		t.Run(name, func(t *testing.T) {
			bundle := filepath.Join(dir, "bundle-"+name)
			writeBundle(t, bundle, c.path, "/bin/sleep", "60")
			r := newRunsc(t, bin, "--network="+c.network, "--ignore-cgroups").in(pin)
			id := randomID("ctlns-net-")
			t.Cleanup(func() { _, _ = r.run("delete", "--force", id) })
			if out, err := r.run("run", "--detach", "--bundle", bundle, id); err != nil {
				t.Logf("--network=%s refused: %v: %.300s", c.network, err, out)
				return
			}
			status, pid, err := r.state(id)
			if err != nil || status != "running" {
				t.Fatalf("runsc state: %q %v", status, err)
			}
			got := nsID(t, filepath.Join("/proc", strconv.Itoa(pid), "ns/net"))
			var gns []string
			for _, g := range gofers(bundle) {
				gns = append(gns, where(nsID(t, filepath.Join("/proc", strconv.Itoa(g), "ns/net"))))
			}
			t.Logf("--network=%s, config path %q: sandbox in the %s namespace; gofers in %v", c.network, c.path, where(got), gns)
			if got != c.want {
				t.Errorf("sandbox in the %s namespace, want the %s", where(got), where(c.want))
			}
			if c.path != "-" {
				worked++
			}
		})
	}
	if worked == 0 {
		t.Fatal("no network mode with a config path worked")
	}
}
