// Package nettest helps tests of cells' networks: a host-wide test lock, snapshots of the host's
// network state to compare before and after, and test hosts — network namespaces the test makes,
// with addresses from 198.51.100.0/24 (TEST-NET-2) only, joined to the host by a veth pair — that
// serve TCP and UDP and record who reached them. Every packet stays on this machine. It is used by
// tests only.
package nettest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Addresses of the tests, all inside 198.51.100.0/24: test hosts take /30s of HostRange, cells
// take /30s of CellPool.
var (
	HostRange = netip.MustParsePrefix("198.51.100.0/26")
	CellPool  = netip.MustParsePrefix("198.51.100.128/25")
)

// Names of the test's own links and namespaces; nothing else on the host uses them.
const (
	linkPrefix  = "ctsth" // root side of a test host's veth: ctsth<i>
	netnsPrefix = "ctst-h"
	lockFile    = "cellos-gvisor-nettest.lock"
)

// Need skips the test unless it runs as root with nft and ip installed (a failure instead when
// CELLOS_REQUIRE_RUNSC=1: CI must run these tests).
func Need(t testing.TB) {
	t.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	for _, bin := range []string{"nft", "ip"} {
		if _, err := lookPath(bin); err != nil {
			missing = append(missing, bin)
		}
	}
	if len(missing) == 0 {
		return
	}
	if os.Getenv("CELLOS_REQUIRE_RUNSC") == "1" {
		t.Fatalf("network tests need %s (CELLOS_REQUIRE_RUNSC=1)", strings.Join(missing, ", "))
	}
	t.Skipf("network tests need %s", strings.Join(missing, ", "))
}

func lookPath(bin string) (string, error) {
	if p, err := exec.LookPath(bin); err == nil {
		return p, nil
	}
	return exec.LookPath("/usr/sbin/" + bin)
}

// Lock serialises the network tests of every test process on this host (go test runs packages in
// parallel): they compare the host's whole network state before and after. It also removes what
// an earlier, killed run of these tests left (links and namespaces with the tests' own names).
func Lock(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(os.TempDir(), lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Minute)
	for unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		if time.Now().After(deadline) {
			t.Fatal("waited 15 minutes for the network test lock")
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Cleanup(func() {
		_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
		_ = f.Close()
	})
	removeStale(t)
}

func removeStale(t testing.TB) {
	out, _ := exec.Command("ip", "-o", "link").Output()
	for line := range strings.Lines(string(out)) {
		fields := strings.Fields(line)
		if len(fields) > 1 {
			name, _, _ := strings.Cut(strings.TrimSuffix(fields[1], ":"), "@")
			if strings.HasPrefix(name, linkPrefix) {
				t.Logf("removing %s, left by an earlier test run", name)
				_ = exec.Command("ip", "link", "del", name).Run()
			}
		}
	}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), netnsPrefix) {
			t.Logf("removing namespace %s, left by an earlier test run", e.Name())
			_ = exec.Command("ip", "netns", "del", e.Name()).Run()
		}
	}
}

// Snapshot is the host's network state as the tests compare it.
func Snapshot(t testing.TB) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"nft", "list", "ruleset"},
		{"ip", "-o", "link"},
		{"ip", "-o", "addr"},
		{"ip", "route", "show", "table", "all"},
		{"ip", "-6", "route", "show", "table", "all"},
		{"ip", "netns", "list"},
	} {
		bin, err := lookPath(args[0])
		if err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(bin, args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
		fmt.Fprintf(&b, "$ %s\n%s\n", strings.Join(args, " "), out)
	}
	keys := []string{"net/ipv4/ip_forward"}
	for _, dev := range []string{"all", "default"} {
		keys = append(keys, "net/ipv4/conf/"+dev+"/forwarding", "net/ipv4/conf/"+dev+"/rp_filter",
			"net/ipv6/conf/"+dev+"/forwarding", "net/ipv6/conf/"+dev+"/disable_ipv6")
	}
	ifaces, _ := net.Interfaces()
	for _, i := range ifaces {
		keys = append(keys, "net/ipv4/conf/"+i.Name+"/forwarding", "net/ipv4/conf/"+i.Name+"/rp_filter")
	}
	b.WriteString("$ sysctl\n")
	for _, k := range keys {
		v, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			continue
		}
		fmt.Fprintf(&b, "%s = %s", strings.ReplaceAll(k, "/", "."), v)
	}
	return b.String()
}

// RequireUnchanged fails the test unless the host's network state is again exactly before.
func RequireUnchanged(t testing.TB, before string) {
	t.Helper()
	var now string
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if now = Snapshot(t); now == before || time.Now().After(deadline) {
			break
		}
	}
	if now != before {
		t.Fatalf("the host's network state changed:\n--- before\n%s\n--- after\n%s", before, now)
	}
}

// Guard locks the network tests (Lock) and checks, at cleanup, that the host's network state is
// as it was when Guard was called. Call it before creating anything.
func Guard(t testing.TB) {
	t.Helper()
	Need(t)
	Lock(t)
	before := Snapshot(t)
	t.Cleanup(func() { RequireUnchanged(t, before) })
}

// InNetns runs f on a thread in the network namespace at path. The thread is never returned to
// the Go scheduler: it ends with f. Sockets f creates stay in that namespace and can be used
// from any goroutine.
func InNetns(path string, f func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			done <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("setns %s: %w", path, err)
			return
		}
		done <- f()
	}()
	return <-done
}

// Host is a test host: a network namespace joined to the host by a veth pair, with the host side
// at Gateway and the namespace side at Addr (a /30 of HostRange), and a default route back
// through the host. Forwarding is enabled on its veth (the host must forward replies arriving
// there), as an operator enables it on an uplink.
type Host struct {
	t       testing.TB
	Index   int
	Netns   string // path
	Link    string // the host side of its veth
	Gateway netip.Addr
	Addr    netip.Addr

	mu    sync.Mutex
	conns map[int][]netip.Addr // TCP port -> peers accepted, in order
	grams map[int][]Datagram   // UDP port -> datagrams received
	close []func()
}

// Datagram is one UDP datagram a test host received.
type Datagram struct {
	From    netip.Addr
	Payload string
}

// NewHost makes test host i (0..15). It is removed at cleanup.
func NewHost(t testing.TB, i int) *Host {
	t.Helper()
	if i < 0 || i >= 1<<(30-HostRange.Bits()) {
		t.Fatalf("test host %d out of range", i)
	}
	base := HostRange.Addr().As4()
	base[3] += byte(4 * i)
	net4 := netip.AddrFrom4(base)
	h := &Host{t: t, Index: i, Link: fmt.Sprintf("%s%d", linkPrefix, i),
		Gateway: net4.Next(), Addr: net4.Next().Next(),
		conns: map[int][]netip.Addr{}, grams: map[int][]Datagram{}}
	ns := fmt.Sprintf("%s%d", netnsPrefix, i)
	h.Netns = "/run/netns/" + ns
	t.Cleanup(h.remove)
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	ip("netns", "add", ns)
	ip("link", "add", h.Link, "type", "veth", "peer", "name", "eth0", "netns", ns)
	if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+h.Link+"/forwarding", []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	ip("addr", "add", h.Gateway.String()+"/30", "dev", h.Link)
	ip("link", "set", h.Link, "up")
	ip("-n", ns, "addr", "add", h.Addr.String()+"/30", "dev", "eth0")
	ip("-n", ns, "link", "set", "eth0", "up")
	ip("-n", ns, "link", "set", "lo", "up")
	ip("-n", ns, "route", "add", "default", "via", h.Gateway.String())
	return h
}

func (h *Host) remove() {
	h.mu.Lock()
	closers := h.close
	h.close = nil
	h.mu.Unlock()
	for _, c := range closers {
		c()
	}
	_ = exec.Command("ip", "link", "del", h.Link).Run()
	_ = exec.Command("ip", "netns", "del", filepath.Base(h.Netns)).Run()
}

// ServeTCP listens on port at the host's address: each connection gets "hello <port>\n" and is
// closed; the peer is recorded.
func (h *Host) ServeTCP(port int) {
	h.t.Helper()
	var l net.Listener
	err := InNetns(h.Netns, func() (err error) {
		l, err = net.Listen("tcp4", netip.AddrPortFrom(h.Addr, uint16(port)).String())
		return err
	})
	if err != nil {
		h.t.Fatal(err)
	}
	h.addCloser(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
			h.mu.Lock()
			h.conns[port] = append(h.conns[port], peer)
			h.mu.Unlock()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			_, _ = fmt.Fprintf(c, "hello %d\n", port)
			_ = c.Close()
		}
	}()
}

// ServeUDP answers each datagram on port at the host's address with "echo <payload>" and records
// it.
func (h *Host) ServeUDP(port int) {
	h.t.Helper()
	var pc net.PacketConn
	err := InNetns(h.Netns, func() (err error) {
		pc, err = net.ListenPacket("udp4", netip.AddrPortFrom(h.Addr, uint16(port)).String())
		return err
	})
	if err != nil {
		h.t.Fatal(err)
	}
	h.addCloser(func() { _ = pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			peer := from.(*net.UDPAddr).AddrPort().Addr().Unmap()
			h.mu.Lock()
			h.grams[port] = append(h.grams[port], Datagram{From: peer, Payload: string(buf[:n])})
			h.mu.Unlock()
			_, _ = pc.WriteTo(append([]byte("echo "), buf[:n]...), from)
		}
	}()
}

func (h *Host) addCloser(f func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.close = append(h.close, f)
}

// Conns returns the peers that connected to TCP port.
func (h *Host) Conns(port int) []netip.Addr {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.conns[port])
}

// Datagrams returns what UDP port received.
func (h *Host) Datagrams(port int) []Datagram {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.grams[port])
}

// Dial connects from inside the test host to addr (TCP) and reads what the peer sends first;
// it returns the error of the connect or of the read.
func (h *Host) Dial(addr netip.AddrPort, timeout time.Duration) (string, error) {
	var c net.Conn
	err := InNetns(h.Netns, func() (err error) {
		c, err = net.DialTimeout("tcp4", addr.String(), timeout)
		return err
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if n > 0 {
		err = nil
	}
	return string(buf[:n]), err
}

// IsRefused reports whether a dial error is a refusal the firewall sent back (an ICMP
// unreachable, or a reset), as opposed to a timeout.
func IsRefused(err error) bool {
	return errors.Is(err, unix.EHOSTUNREACH) || errors.Is(err, unix.ECONNREFUSED) ||
		errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM)
}

// ListenTCP listens on addr in the caller's (the host's) namespace and records peers, as
// ServeTCP does for a test host: the host's own service.
type Listener struct {
	mu    sync.Mutex
	peers []netip.Addr
	l     net.Listener
}

// ListenHost starts a service of the host itself on addr; it is closed at cleanup.
func ListenHost(t testing.TB, addr netip.AddrPort) *Listener {
	t.Helper()
	l, err := net.Listen("tcp4", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	s := &Listener{l: l}
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.peers = append(s.peers, c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap())
			s.mu.Unlock()
			_, _ = c.Write([]byte("host\n"))
			_ = c.Close()
		}
	}()
	return s
}

// Peers returns who connected.
func (s *Listener) Peers() []netip.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.peers)
}

// Run runs a command and returns its combined output, failing the test when it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	bin, err := lookPath(name)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out)
}
