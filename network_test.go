package gvisor_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/nettest"
)

// The egress tests run real cells against test hosts in network namespaces the test makes, with
// addresses from 198.51.100.0/24 only (test hosts in 198.51.100.0/26, cells in 198.51.100.128/25):
// every packet stays on this machine. Each test guards the host: `nft list ruleset`, links,
// addresses, routes, namespaces and the forwarding and reverse-path sysctls are exactly as before
// when it ends. The tests do not run in parallel with each other (nor with those of another test
// process: nettest.Lock), since they compare the host's whole network state.
//
// With a runsc that can do sandbox networking (`make test-current`) the cells run in that mode.
// With one that cannot (Debian's, `make test`), TestEgressRuntimeSupport checks that egress is
// refused with ErrUnsupported, and the other tests run the same checks in the host-stack mode
// (WithHostStackNetworking(true)), which enforces the same allowlist.

// egressOptions returns the options of the tests' backends: the tests' cell network, and the
// host-stack mode when the runsc cannot do sandbox networking. It returns the mode cells get.
func egressOptions(t *testing.T, extra ...gvisor.Option) ([]gvisor.Option, string) {
	t.Helper()
	requireRunsc(t)
	opts := append([]gvisor.Option{gvisor.WithCellNetwork(nettest.CellPool.String())}, extra...)
	b, err := gvisor.New(opts...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	mode, err := b.EgressMode(context.Background())
	if err != nil {
		require.ErrorIs(t, err, cellos.ErrUnsupported)
		opts = append(opts, gvisor.WithHostStackNetworking(true))
		b, err = gvisor.New(opts...)
		require.NoError(t, err)
		t.Cleanup(func() { _ = b.Close(context.Background()) })
		mode, err = b.EgressMode(context.Background())
		require.NoError(t, err)
		require.Equal(t, gvisor.NetworkHost, mode)
	}
	t.Logf("cells with egress rules run with --network=%s", mode)
	return opts, mode
}

// newEgressEnv guards the host's network state, then makes a real-runsc env with the tests'
// egress options.
func newEgressEnv(t *testing.T, extra ...gvisor.Option) (*realEnv, string) {
	t.Helper()
	nettest.Guard(t) // first: its check runs after every other cleanup
	opts, mode := egressOptions(t, extra...)
	return newRealEnv(t, opts...), mode
}

func egressDoc(id string, rules ...cellos.EgressRule) *cellos.ExecutionCellDocument {
	d := doc(id, "/bin/sh", "-c", "echo up; sleep 60")
	d.Spec.Network = &cellos.NetworkSpec{Egress: rules}
	d.Spec.Lifetime = &cellos.LifetimeSpec{TTLSeconds: 120}
	return d
}

func tcp(ip string, port int) cellos.EgressRule {
	return cellos.EgressRule{CIDR: ip + "/32", Port: port, Protocol: "tcp"}
}

func udp(ip string, port int) cellos.EgressRule {
	return cellos.EgressRule{CIDR: ip + "/32", Port: port, Protocol: "udp"}
}

// The prober runs inside a cell (python3 from the host's /usr): it listens on TCP 7000 (and
// reports every connection it accepts as INBOUND), waits for /ctl/go, tries each target of
// /ctl/targets.json — a TCP connect and read, or a UDP datagram and its echo — prints one RESULT
// line each and DONE, then waits for /ctl/stop. Each try is bounded (3 s), and so are the waits.
const prober = `
import errno, json, os, socket, sys, threading, time
def say(*a): print(*a, flush=True)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 7000)); srv.listen(16)
def serve():
    while True:
        c, a = srv.accept(); say("INBOUND", a[0]); c.close()
threading.Thread(target=serve, daemon=True).start()
def wait(path, limit):
    end = time.time() + limit
    while not os.path.exists(path):
        if time.time() > end: say("GAVE-UP", path); sys.exit(3)
        time.sleep(0.05)
say("LISTENING")
wait("/ctl/go", 60)
for t in json.load(open("/ctl/targets.json")):
    start = time.time()
    try:
        if t["proto"] == "tcp":
            s = socket.create_connection((t["host"], t["port"]), timeout=3)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
            s.connect((t["host"], t["port"])); s.send(("ping " + t["name"]).encode())
        s.settimeout(3)
        data = s.recv(100).decode().strip().replace(" ", "_")
        s.close()
        say("RESULT", t["name"], "ok", data or "-", "%.2f" % (time.time() - start))
    except socket.timeout:
        say("RESULT", t["name"], "timeout", "-", "%.2f" % (time.time() - start))
    except OSError as e:
        say("RESULT", t["name"], "refused", errno.errorcode.get(e.errno, str(e.errno)), "%.2f" % (time.time() - start))
say("DONE")
wait("/ctl/stop", 90)
`

type target struct {
	Name  string `json:"name"`
	Proto string `json:"proto"`
	Host  string `json:"host"`
	Port  int    `json:"port"`
}

// result is one RESULT line of the prober.
type result struct {
	Status string // ok, refused, timeout
	Detail string // what the peer sent (ok), or the errno name (refused)
	Took   time.Duration
}

// probeCell is a cell running the prober, with its control directory.
type probeCell struct {
	e   *realEnv
	id  string
	ctl string
	h   cellos.CellHandle
	net *gvisor.CellNetwork
}

func startProber(t *testing.T, e *realEnv, id string, rules ...cellos.EgressRule) *probeCell {
	t.Helper()
	ctl := t.TempDir()
	require.NoError(t, os.Chmod(ctl, 0o755))
	d := doc(id, "/usr/bin/python3", "-c", prober)
	d.Spec.Network = &cellos.NetworkSpec{Egress: rules}
	d.Spec.Mounts = []cellos.MountSpec{{Type: cellos.MountBind, Source: ctl, Destination: "/ctl"}}
	d.Spec.Lifetime = &cellos.LifetimeSpec{TTLSeconds: 180}
	p := &probeCell{e: e, id: id, ctl: ctl, h: e.create(d)}
	require.NotNil(t, p.h.NftRulesApplied, "a cell with egress rules has host firewall rules")
	assert.True(t, *p.h.NftRulesApplied)
	var err error
	p.net, err = e.b.NetworkOf(id)
	require.NoError(t, err)
	require.NotNil(t, p.net)
	p.waitFor(t, "LISTENING")
	return p
}

// run gives the prober its targets and returns its results once it is DONE.
func (p *probeCell) run(t *testing.T, targets ...target) map[string]result {
	t.Helper()
	data, err := json.Marshal(targets)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(p.ctl, "targets.json"), data, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(p.ctl, "go"), nil, 0o644))
	p.waitFor(t, "DONE")
	out := map[string]result{}
	for line := range strings.Lines(p.e.out(p.id).stdout.String()) {
		f := strings.Fields(line)
		if len(f) == 5 && f[0] == "RESULT" {
			var secs float64
			_, _ = fmt.Sscan(f[4], &secs)
			out[f[1]] = result{Status: f[2], Detail: f[3], Took: time.Duration(secs * float64(time.Second))}
		}
	}
	return out
}

func (p *probeCell) waitFor(t *testing.T, word string) {
	t.Helper()
	re := regexp.MustCompile(`(?m)^` + word + `$`)
	require.Eventually(t, func() bool { return re.MatchString(p.e.out(p.id).stdout.String()) }, 60*time.Second, 20*time.Millisecond,
		"cell %s never said %s; stdout: %s; stderr: %s", p.id, word, p.e.out(p.id).stdout.String(), p.e.out(p.id).stderr.String())
}

// inbound lists the peers whose connections the prober accepted.
func (p *probeCell) inbound() []string {
	var peers []string
	for line := range strings.Lines(p.e.out(p.id).stdout.String()) {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "INBOUND" {
			peers = append(peers, f[1])
		}
	}
	return peers
}

// stop lets the prober exit and waits for it.
func (p *probeCell) stop(t *testing.T) {
	t.Helper()
	require.NoError(t, os.WriteFile(filepath.Join(p.ctl, "stop"), nil, 0o644))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := p.e.b.WaitForExit(ctx, p.id)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 0, Reason: cellos.ExitExited}, st, "stderr: %s", p.e.out(p.id).stderr.String())
}

// refusedByFirewall asserts that a try was refused at once by the host's reject rule (an ICMP
// admin-prohibited: "no route to host"), not by the peer and not by a timeout.
func refusedByFirewall(t *testing.T, r map[string]result, name string) {
	t.Helper()
	got, ok := r[name]
	require.True(t, ok, "no result for %s: %v", name, r)
	assert.Equal(t, "refused", got.Status, "%s: %+v", name, got)
	assert.Equal(t, "EHOSTUNREACH", got.Detail, "%s: %+v", name, got)
	assert.Less(t, got.Took, 2*time.Second, "%s: a refusal is immediate", name)
}

// deniedUDP asserts that a UDP try got no answer. The host's reject sends an ICMP
// admin-prohibited back, which the host kernel's stack (host-stack mode) reports to the socket
// at once, and gVisor's netstack does not: there the try times out. Either way nothing arrives
// (the tests check the destination too).
func deniedUDP(t *testing.T, r map[string]result, name string, mode string) {
	t.Helper()
	got, ok := r[name]
	require.True(t, ok, "no result for %s: %v", name, r)
	if mode == gvisor.NetworkHost || got.Status != "timeout" {
		refusedByFirewall(t, r, name)
	}
}

func TestEgressRuntimeSupport(t *testing.T) {
	nettest.Guard(t)
	requireRunsc(t)
	e := newRealEnv(t, gvisor.WithCellNetwork(nettest.CellPool.String()))
	ctx := context.Background()
	info, err := e.b.Runtime(ctx)
	require.NoError(t, err)
	mode, modeErr := e.b.EgressMode(ctx)
	// Measured on these machines: Debian's runsc refuses sandbox networking on this
	// kernel, the current one runs it. Any other binary is taken at its probe's word.
	switch info.Version {
	case "0.0~20221219.0":
		require.ErrorIs(t, modeErr, cellos.ErrUnsupported, "Debian's runsc cannot do sandbox networking here")
	case "VERSION_MISSING":
		require.NoError(t, modeErr, "the current runsc does sandbox networking")
	}
	d := egressDoc("egress-support", tcp("198.51.100.2", 8080))
	if modeErr != nil {
		require.ErrorIs(t, modeErr, cellos.ErrUnsupported)
		assert.ErrorContains(t, modeErr, "WithHostStackNetworking")
		_, err := e.b.Create(ctx, d)
		require.ErrorIs(t, err, cellos.ErrUnsupported)
		require.NotErrorIs(t, err, cellos.ErrHost)
		assert.Equal(t, []string{"spec.network.egress"}, cellos.Fields(err))
		assert.Contains(t, err.Error(), `"egress-support"`)
		assert.Empty(t, e.leftovers())

		host, err := gvisor.New(gvisor.WithBundleRoot(e.root), gvisor.WithHostStackNetworking(true), gvisor.WithLogger(zaptest.NewLogger(t)))
		require.NoError(t, err)
		t.Cleanup(func() { _ = host.Close(context.Background()) })
		mode, err = host.EgressMode(ctx)
		require.NoError(t, err)
		assert.Equal(t, gvisor.NetworkHost, mode, "the host-stack mode, when allowed")
	} else {
		assert.Equal(t, gvisor.NetworkSandbox, mode)
		// Even when the host-stack mode is allowed, a runsc that can do sandbox networking gets it.
		host, err := gvisor.New(gvisor.WithHostStackNetworking(true))
		require.NoError(t, err)
		t.Cleanup(func() { _ = host.Close(context.Background()) })
		mode, err = host.EgressMode(ctx)
		require.NoError(t, err)
		assert.Equal(t, gvisor.NetworkSandbox, mode)
	}

	// IPv6 rules are refused whatever the runsc: a cell's link is IPv4 only.
	d6 := egressDoc("egress-v6", cellos.EgressRule{CIDR: "2001:db8::/32", Port: 443, Protocol: "tcp"})
	_, err = e.b.Create(ctx, d6)
	require.ErrorIs(t, err, cellos.ErrUnsupported)
	assert.Equal(t, []string{"spec.network.egress[0].cidr"}, cellos.Fields(err))

	// A missing uplink is the host's fault.
	up, err := gvisor.New(gvisor.WithBundleRoot(e.root), gvisor.WithEgressUplink("nosuchif0"), gvisor.WithHostStackNetworking(true))
	require.NoError(t, err)
	t.Cleanup(func() { _ = up.Close(context.Background()) })
	_, err = up.Create(ctx, egressDoc("egress-uplink", tcp("198.51.100.2", 8080)))
	require.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "nosuchif0")
	assert.Empty(t, e.leftovers())

	// Options are checked.
	for _, opt := range []gvisor.Option{gvisor.WithCellNetwork("10.77.0.1/16"), gvisor.WithCellNetwork("10.77.0.0/31"),
		gvisor.WithCellNetwork("2001:db8::/64"), gvisor.WithCellNetwork("nope"), gvisor.WithEgressUplink(""), gvisor.WithEgressUplink("a b")} {
		_, err := gvisor.New(opt)
		assert.Error(t, err)
	}
}

// TestEgressNotForOtherCells: a cell without egress rules is what it always was — no host
// firewall rules, no namespace of the library's, --network=none — and the host's network state
// does not change while it runs.
func TestEgressNotForOtherCells(t *testing.T) {
	nettest.Guard(t)
	before := nettest.Snapshot(t)
	e := newRealEnv(t)
	h := e.create(sh("no-egress", "echo up; sleep 30"))
	assert.Nil(t, h.NftRulesApplied)
	net, err := e.b.NetworkOf(h.CellID)
	require.NoError(t, err)
	assert.Nil(t, net)
	require.Eventually(t, func() bool { return e.out("no-egress").stdout.String() == "up\n" }, 30*time.Second, 10*time.Millisecond)
	assert.Equal(t, before, nettest.Snapshot(t), "a cell without egress rules changes nothing of the host's network")
	cfg, err := os.ReadFile(filepath.Join(e.root, "no-egress", "config.json"))
	require.NoError(t, err)
	assert.Contains(t, string(cfg), "{\n        \"type\": \"network\"\n      }", "a new, empty network namespace")
	shim, err := os.ReadFile(filepath.Join(e.root, "no-egress", "shim.json"))
	require.NoError(t, err)
	assert.NotContains(t, string(shim), "Network")
	assert.NoFileExists(t, filepath.Join(e.root, "no-egress", "net.json"))
	for _, pid := range processesUnder(e.root) {
		if strings.Contains(pid.cmdline, " run ") {
			assert.Contains(t, pid.cmdline, "--network=none")
		}
	}
}

type proc struct{ pid, cmdline string }

// processesUnder lists processes whose command line names dir.
func processesUnder(dir string) []proc {
	var out []proc
	paths, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(data), dir) {
			out = append(out, proc{filepath.Base(filepath.Dir(p)), strings.ReplaceAll(string(data), "\x00", " ")})
		}
	}
	return out
}

// TestEgressAllowlist: a cell reaches exactly its declared destinations: the allowed host:port
// (TCP, and UDP where declared); not the same host on another port, not another host, not UDP
// where only TCP is declared, not the host's own services (on its gateway address or any other
// address of the host); and nothing can connect into it, neither a test host nor the host.
func TestEgressAllowlist(t *testing.T) {
	e, mode := newEgressEnv(t)
	h0, h1 := nettest.NewHost(t, 0), nettest.NewHost(t, 1) // 198.51.100.2, 198.51.100.6
	h0.ServeTCP(8080)
	h0.ServeTCP(8081)
	h0.ServeUDP(5353)
	h1.ServeTCP(8080)
	h1.ServeTCP(5353)
	h1.ServeUDP(5353)
	p := startProber(t, e, "allow", tcp("198.51.100.2", 8080), udp("198.51.100.2", 5353), tcp("198.51.100.6", 5353))
	assert.Equal(t, mode, p.net.Mode)
	cellAddr, gw := p.net.CellAddress.Addr(), p.net.HostAddress.Addr()
	assert.True(t, nettest.CellPool.Contains(cellAddr), "%v", cellAddr)
	assert.FileExists(t, p.net.Namespace)
	assert.Contains(t, nettest.Run(t, "ip", "-o", "link", "show", p.net.HostInterface), p.net.HostInterface)
	// The host's own services: one on the cell's gateway address, one on another host address.
	gwSvc := nettest.ListenHost(t, netip.AddrPortFrom(gw, 18080))
	hostSvc := nettest.ListenHost(t, netip.AddrPortFrom(h0.Gateway, 18081))

	r := p.run(t,
		target{"allowed-tcp", "tcp", "198.51.100.2", 8080},
		target{"same-host-other-port", "tcp", "198.51.100.2", 8081},
		target{"other-host", "tcp", "198.51.100.6", 8080},
		target{"allowed-udp", "udp", "198.51.100.2", 5353},
		target{"other-host-allowed-tcp", "tcp", "198.51.100.6", 5353},
		target{"udp-where-only-tcp", "udp", "198.51.100.6", 5353},
		target{"host-service-on-gateway", "tcp", gw.String(), 18080},
		target{"host-service", "tcp", h0.Gateway.String(), 18081},
		target{"self", "tcp", cellAddr.String(), 7000},
	)
	t.Logf("results: %+v", r)
	assert.Equal(t, result{Status: "ok", Detail: "hello_8080"}, withoutTime(r["allowed-tcp"]))
	assert.Equal(t, result{Status: "ok", Detail: "echo_ping_allowed-udp"}, withoutTime(r["allowed-udp"]))
	assert.Equal(t, result{Status: "ok", Detail: "hello_5353"}, withoutTime(r["other-host-allowed-tcp"]))
	assert.Equal(t, "ok", r["self"].Status, "the cell's own listener is up: %+v", r["self"])
	refusedByFirewall(t, r, "same-host-other-port")
	refusedByFirewall(t, r, "other-host")
	deniedUDP(t, r, "udp-where-only-tcp", mode)
	refusedByFirewall(t, r, "host-service-on-gateway")
	refusedByFirewall(t, r, "host-service")

	// What the destinations saw: the allowed ones, from the cell's own address (no NAT without
	// an uplink); the refused ones nothing.
	assert.Equal(t, []netip.Addr{cellAddr}, h0.Conns(8080))
	assert.Empty(t, h0.Conns(8081))
	assert.Empty(t, h1.Conns(8080))
	assert.Equal(t, []netip.Addr{cellAddr}, h1.Conns(5353))
	assert.Equal(t, []nettest.Datagram{{From: cellAddr, Payload: "ping allowed-udp"}}, h0.Datagrams(5353))
	assert.Empty(t, h1.Datagrams(5353), "UDP where only TCP is declared never arrives")
	assert.Empty(t, gwSvc.Peers())
	assert.Empty(t, hostSvc.Peers())

	// Inbound: a test host and the host itself try to connect to the cell's listener.
	_, err := h0.Dial(netip.AddrPortFrom(cellAddr, 7000), 3*time.Second)
	require.Error(t, err, "a test host must not reach into the cell")
	assert.True(t, nettest.IsRefused(err), "refused at once, not timed out: %v", err)
	err = dialFromHost(netip.AddrPortFrom(cellAddr, 7000), 3*time.Second)
	require.Error(t, err, "the host must not reach into the cell")
	assert.True(t, nettest.IsRefused(err), "refused at once, not timed out: %v", err)
	assert.Equal(t, []string{cellAddr.String()}, p.inbound(), "only the cell's own connection reached its listener")

	// A process exec'd into the cell is held to the same allowlist.
	var out syncBuffer
	tryTCP := `import socket, sys
for h in sys.argv[1:]:
    try: socket.create_connection((h, 8080), timeout=3).close(); print(h, "ok")
    except OSError as e: print(h, type(e).__name__)`
	st, err := e.b.Exec(context.Background(), p.id, cellos.RunSpec{Argv: []string{"/usr/bin/python3", "-c", tryTCP, "198.51.100.2", "198.51.100.6"}}, &out, &out)
	require.NoError(t, err)
	assert.Equal(t, 0, st.Code)
	assert.Equal(t, "198.51.100.2 ok\n198.51.100.6 OSError\n", out.String())
	assert.Equal(t, []netip.Addr{cellAddr, cellAddr}, h0.Conns(8080))

	p.stop(t)
	e.destroy(p.h)
	assert.NoFileExists(t, p.net.Namespace)
	_, err = exec.Command("ip", "link", "show", p.net.HostInterface).CombinedOutput()
	assert.Error(t, err, "the veth is gone")
}

func withoutTime(r result) result { r.Took = 0; return r }

// dialFromHost connects from the host's own namespace.
func dialFromHost(addr netip.AddrPort, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp4", addr.String(), timeout)
	if err == nil {
		_ = c.Close()
	}
	return err
}

// TestEgressCellsDoNotShareAllowlists: ten cells at once, each allowed one port of a test host,
// each trying all ten ports: each reaches its own and no other.
func TestEgressCellsDoNotShareAllowlists(t *testing.T) {
	e, _ := newEgressEnv(t)
	h0 := nettest.NewHost(t, 0)
	const n = 10
	var targets []target
	for i := range n {
		h0.ServeTCP(9000 + i)
		targets = append(targets, target{fmt.Sprintf("port-%d", 9000+i), "tcp", "198.51.100.2", 9000 + i})
	}
	cells := make([]*probeCell, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cells[i] = startProber(t, e, fmt.Sprintf("share-%d", i), tcp("198.51.100.2", 9000+i))
		}()
	}
	wg.Wait()
	for _, c := range cells {
		require.NotNil(t, c)
	}
	addrs := map[netip.Addr]bool{}
	for _, c := range cells {
		addrs[c.net.CellAddress.Addr()] = true
	}
	require.Len(t, addrs, n, "every cell has an address of its own")
	results := make([]map[string]result, n)
	for i, c := range cells {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = c.run(t, targets...)
		}()
	}
	wg.Wait()
	for i, r := range results {
		var ok []string
		for name, res := range r {
			if res.Status == "ok" {
				ok = append(ok, name)
			} else {
				assert.Equal(t, "EHOSTUNREACH", res.Detail, "cell %d %s: %+v", i, name, res)
			}
		}
		assert.Equal(t, []string{fmt.Sprintf("port-%d", 9000+i)}, ok, "cell %d reaches exactly its own port", i)
		assert.Len(t, r, n)
		assert.Equal(t, []netip.Addr{cells[i].net.CellAddress.Addr()}, h0.Conns(9000+i), "port %d", 9000+i)
	}
	for _, c := range cells {
		c.stop(t)
	}
}

// TestEgressForgedSourceGainsNothing: a cell that forges its source address — the address of
// another cell that may reach what it may not — gains nothing. Cells have no capabilities, so
// the test plays the compromised cell from the kernel side of its namespace: it gives the cell's
// interface the other cell's address and sends from it, through the cell's veth.
func TestEgressForgedSourceGainsNothing(t *testing.T) {
	e, mode := newEgressEnv(t)
	h0 := nettest.NewHost(t, 0)
	h0.ServeUDP(6001)
	h0.ServeUDP(6002)
	a := e.create(egressDoc("forger", udp("198.51.100.2", 6001)))
	b := e.create(egressDoc("victim", udp("198.51.100.2", 6002)))
	na, err := e.b.NetworkOf(a.CellID)
	require.NoError(t, err)
	nb, err := e.b.NetworkOf(b.CellID)
	require.NoError(t, err)
	for _, id := range []string{a.CellID, b.CellID} { // the sandboxes have set up their network
		require.Eventually(t, func() bool { return e.out(id).stdout.String() == "up\n" }, 60*time.Second, 10*time.Millisecond)
	}
	ns := filepath.Base(na.Namespace)
	own, forged := na.CellAddress.Addr(), nb.CellAddress.Addr()
	if mode == gvisor.NetworkSandbox { // gVisor took the address off the kernel's interface
		nettest.Run(t, "ip", "-n", ns, "addr", "add", own.String()+"/32", "dev", na.CellInterface)
	}
	nettest.Run(t, "ip", "-n", ns, "addr", "add", forged.String()+"/32", "dev", na.CellInterface)
	nettest.Run(t, "ip", "-n", ns, "route", "replace", nettest.HostRange.String(), "via", na.HostAddress.Addr().String(), "dev", na.CellInterface, "onlink")
	send := func(from netip.Addr, port int, payload string) {
		t.Helper()
		err := nettest.InNetns(na.Namespace, func() error {
			return sendUDP(from, netip.AddrPortFrom(h0.Addr, uint16(port)), payload)
		})
		require.NoError(t, err)
	}
	payloads := func(port int) []string {
		var out []string
		for _, d := range h0.Datagrams(port) {
			out = append(out, d.From.String()+" "+d.Payload)
		}
		return out
	}

	// Control: from its own address to its own destination, the path works.
	send(own, 6001, "control")
	require.Eventually(t, func() bool { return len(h0.Datagrams(6001)) == 1 }, 5*time.Second, 10*time.Millisecond)
	assert.Equal(t, []string{own.String() + " control"}, payloads(6001))

	// Forged: the victim's address, to the victim's destination and to its own.
	send(forged, 6002, "forged-to-victims")
	send(forged, 6001, "forged-to-own")
	// Without reverse-path filtering (a host whose net.ipv4.conf.all.rp_filter allows it), only
	// the rules stand between the forger and the victim's destination: they match on the
	// interface, so the forger still gets its own allowlist, not the victim's.
	nettest.Run(t, "sysctl", "-qw", "net.ipv4.conf."+na.HostInterface+".rp_filter=0")
	send(forged, 6002, "forged-to-victims-no-rpf")
	send(forged, 6001, "forged-to-own-no-rpf")
	require.Eventually(t, func() bool { return len(h0.Datagrams(6001)) == 2 }, 5*time.Second, 10*time.Millisecond)
	time.Sleep(500 * time.Millisecond) // anything else in flight arrives
	assert.Empty(t, payloads(6002), "the victim's destination never hears from the forger")
	assert.Equal(t, []string{own.String() + " control", forged.String() + " forged-to-own-no-rpf"}, payloads(6001),
		"with reverse-path filtering (the library's setting) forged packets are dropped; without, the forger reaches only what it could reach anyway")
}

// sendUDP sends one datagram from the address from (bound in the caller's namespace).
func sendUDP(from netip.Addr, to netip.AddrPort, payload string) error {
	c, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(from, 0)), net.UDPAddrFromAddrPort(to))
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(payload))
	return err
}

// TestEgressUplinkMasquerades: with WithEgressUplink, allowed traffic leaving through the uplink
// carries the uplink's address, not the cell's. The uplink here is a test host's link, so the
// packets stay on this machine.
func TestEgressUplinkMasquerades(t *testing.T) {
	nettest.Guard(t)
	h2 := nettest.NewHost(t, 2) // gateway 198.51.100.9, host 198.51.100.10
	opts, _ := egressOptions(t, gvisor.WithEgressUplink(h2.Link))
	e := newRealEnv(t, opts...)
	h0 := nettest.NewHost(t, 0)
	h2.ServeTCP(8080)
	h0.ServeTCP(8080)
	p := startProber(t, e, "masq", tcp("198.51.100.10", 8080), tcp("198.51.100.2", 8080))
	assert.Equal(t, h2.Link, p.net.Uplink)
	assert.Contains(t, nettest.Run(t, "nft", "list", "table", "inet", "cellos"), fmt.Sprintf("oifname %q masquerade", h2.Link))
	r := p.run(t, target{"through-uplink", "tcp", "198.51.100.10", 8080}, target{"elsewhere", "tcp", "198.51.100.2", 8080})
	assert.Equal(t, "ok", r["through-uplink"].Status, "%+v", r)
	assert.Equal(t, "ok", r["elsewhere"].Status, "%+v", r)
	assert.Equal(t, []netip.Addr{h2.Gateway}, h2.Conns(8080), "masqueraded to the uplink's address")
	assert.Equal(t, []netip.Addr{p.net.CellAddress.Addr()}, h0.Conns(8080), "not through the uplink: the cell's own address")
	p.stop(t)
}

// TestEgressCreateFailureLeavesNothing: a Create that fails after the cell's network exists
// removes it; one that finds a leftover namespace of the same cell refuses (ErrAlreadyExists)
// and leaves it for Destroy, which removes it even without a bundle.
func TestEgressCreateFailureLeavesNothing(t *testing.T) {
	e, _ := newEgressEnv(t)
	ctx := context.Background()

	// A leftover namespace named after the cell.
	ns := gvisor.RunscID(e.root, "leftover")
	nettest.Run(t, "ip", "netns", "add", ns)
	_, err := e.b.Create(ctx, egressDoc("leftover", tcp("198.51.100.2", 8080)))
	require.ErrorIs(t, err, cellos.ErrAlreadyExists)
	assert.Contains(t, err.Error(), "Destroy or Recover removes it")
	assert.FileExists(t, "/run/netns/"+ns, "not Create's to remove")
	assert.Empty(t, e.leftovers())
	e.destroy(cellos.CellHandle{CellID: "leftover"})
	assert.NoFileExists(t, "/run/netns/"+ns)

	// A failure after the network is up (writing the shim's config): plant a directory where it
	// goes as soon as the network's record appears. Racy by nature; a few tries make it sure.
	failed := false
	for i := 0; i < 5 && !failed; i++ {
		id := fmt.Sprintf("late-failure-%d", i)
		bundle := filepath.Join(e.root, id)
		stop := make(chan struct{})
		planted := make(chan bool, 1)
		go func() {
			for {
				select {
				case <-stop:
					planted <- false
					return
				default:
				}
				if _, err := os.Stat(filepath.Join(bundle, "net.json")); err == nil {
					tmp := filepath.Join(bundle, "shim.json.tmp") // not empty: nothing removes it in passing
					planted <- os.Mkdir(tmp, 0o700) == nil && os.WriteFile(filepath.Join(tmp, "x"), nil, 0o600) == nil
					return
				}
				time.Sleep(200 * time.Microsecond)
			}
		}()
		h, err := e.b.Create(ctx, egressDoc(id, tcp("198.51.100.2", 8080)))
		close(stop)
		<-planted
		if err == nil {
			e.destroy(h)
			continue
		}
		require.ErrorIs(t, err, cellos.ErrHost)
		assert.Contains(t, err.Error(), "shim.json")
		failed = true
		assert.NoFileExists(t, "/run/netns/"+gvisor.RunscID(e.root, id))
		assert.Empty(t, e.leftovers())
	}
	require.True(t, failed, "the late failure never happened")
}

// TestEgressTeardownFromAnotherBackend: Destroy by a Backend that did not create the cell (it
// reads the bundle's record) removes its network.
func TestEgressTeardownFromAnotherBackend(t *testing.T) {
	e, _ := newEgressEnv(t)
	opts, _ := egressOptions(t)
	other, err := gvisor.New(append(opts, gvisor.WithBundleRoot(e.root), gvisor.WithLogger(zaptest.NewLogger(t)))...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = other.Close(context.Background()) })
	h, err := other.Create(context.Background(), egressDoc("elsewhere", tcp("198.51.100.2", 8080)))
	require.NoError(t, err)
	n, err := other.NetworkOf(h.CellID)
	require.NoError(t, err)
	require.FileExists(t, n.Namespace)
	rep := e.destroy(cellos.CellHandle{CellID: "elsewhere"})
	assert.True(t, rep.Destroyed)
	assert.NoFileExists(t, n.Namespace)
	_, _ = other.Destroy(context.Background(), h) // forget it there; nothing is left to remove
}

// TestEgressRulesDoNotReachTheHost: a rule that would reach link-local (cloud metadata),
// loopback, an address of the host or the cell network through a wider range is refused at
// Create, before anything is written; the host's address named as a /32 is reached; and an
// address the host gains after Create inside a wider rule is refused at packet time.
func TestEgressRulesDoNotReachTheHost(t *testing.T) {
	e, _ := newEgressEnv(t)
	ctx := context.Background()
	h0 := nettest.NewHost(t, 0) // the host's 198.51.100.1, test host 198.51.100.2
	for _, tc := range []struct {
		cidr string
		want []string
	}{
		{"0.0.0.0/0", []string{"169.254.0.0/16 (link-local", "169.254.169.254", "127.0.0.0/8 (loopback: the host's own services)", `"169.254.169.254/32"`}},
		{"169.254.0.0/16", []string{"169.254.169.254"}},
		{"198.51.100.0/29", []string{"this host's own address 198.51.100.1 (" + h0.Link + ")", `as a /32 (e.g. "198.51.100.1/32")`}},
		{"198.51.100.0/24", []string{"198.51.100.1 (" + h0.Link + ")", "the cell network 198.51.100.128/25"}},
		{"198.51.100.128/26", []string{"inside the cell network 198.51.100.128/25"}},
	} {
		_, err := e.b.Create(ctx, egressDoc("refused", tcp("198.51.100.2", 8080), cellos.EgressRule{CIDR: tc.cidr, Port: 80, Protocol: "tcp"}))
		require.ErrorIs(t, err, cellos.ErrInvalidSpec, tc.cidr)
		assert.Equal(t, []string{"spec.network.egress[1].cidr"}, cellos.Fields(err), tc.cidr)
		assert.Contains(t, err.Error(), `create cell "refused": invalid cell spec: spec.network.egress[1].cidr: "`+tc.cidr+`" `)
		for _, w := range tc.want {
			assert.Contains(t, err.Error(), w, tc.cidr)
		}
	}
	assert.Empty(t, e.leftovers())
	assert.NoFileExists(t, "/run/netns/"+gvisor.RunscID(e.root, "refused"))

	p := startProber(t, e, "host-guard", tcp(h0.Gateway.String(), 18081), cellos.EgressRule{CIDR: "198.51.100.32/27", Port: 18082, Protocol: "tcp"})
	h8 := nettest.NewHost(t, 8) // the host gains 198.51.100.33, inside the wider rule
	h8.ServeTCP(18082)
	named := nettest.ListenHost(t, netip.AddrPortFrom(h0.Gateway, 18081))
	gained := nettest.ListenHost(t, netip.AddrPortFrom(h8.Gateway, 18082))
	r := p.run(t,
		target{"named-host-address", "tcp", h0.Gateway.String(), 18081},
		target{"wider-rule", "tcp", h8.Addr.String(), 18082},
		target{"gained-host-address", "tcp", h8.Gateway.String(), 18082},
	)
	t.Logf("results: %+v", r)
	cellAddr := p.net.CellAddress.Addr()
	assert.Equal(t, result{Status: "ok", Detail: "host"}, withoutTime(r["named-host-address"]))
	assert.Equal(t, result{Status: "ok", Detail: "hello_18082"}, withoutTime(r["wider-rule"]))
	refusedByFirewall(t, r, "gained-host-address")
	assert.Equal(t, []netip.Addr{cellAddr}, named.Peers())
	assert.Equal(t, []netip.Addr{cellAddr}, h8.Conns(18082))
	assert.Empty(t, gained.Peers())
	p.stop(t)
}

// TestEgressGuardRoutesLeavePoolUsable: a leak guard covering the cell network — an
// unreachable, blackhole or prohibit route — does not take it: the cell's /30 route is more
// specific, and the cell's traffic and its replies pass.
func TestEgressGuardRoutesLeavePoolUsable(t *testing.T) {
	e, _ := newEgressEnv(t)
	h0 := nettest.NewHost(t, 0)
	h0.ServeTCP(8080)
	pool := nettest.CellPool.String()
	const connect = `import socket, sys
try: print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).recv(100).decode().strip())
except OSError as e: print(type(e).__name__, e)`
	for _, typ := range []string{"unreachable", "blackhole", "prohibit"} {
		nettest.Run(t, "ip", "route", "add", typ, pool)
		t.Cleanup(func() { _ = exec.Command("ip", "route", "del", typ, pool).Run() })
		id := "guard-" + typ
		d := doc(id, "/usr/bin/python3", "-c", connect, h0.Addr.String(), "8080")
		d.Spec.Network = &cellos.NetworkSpec{Egress: []cellos.EgressRule{tcp(h0.Addr.String(), 8080)}}
		st, err := e.run(d)
		require.NoError(t, err, typ)
		assert.Equal(t, cellos.ExitStatus{Code: 0, Reason: cellos.ExitExited}, st, typ)
		assert.Equal(t, "hello 8080\n", e.out(id).stdout.String(), "%s: stderr %s", typ, e.out(id).stderr.String())
		n, err := e.b.NetworkOf(id)
		require.NoError(t, err)
		require.NotNil(t, n)
		assert.True(t, nettest.CellPool.Contains(n.CellAddress.Addr()), "%s: %v", typ, n.CellAddress)
		e.destroy(cellos.CellHandle{CellID: id})
		nettest.Run(t, "ip", "route", "del", typ, pool)
	}
	assert.Len(t, h0.Conns(8080), 3)
}

// TestEgressForgedNetRecordIgnored: the bundle's net.json is display data, never an instruction.
// A record naming another namespace — here "../../<a directory with a tmpfs on it>", which
// /run/netns/<name> would resolve to — is refused with a warning by Destroy from another Backend
// and by Recover, and the directory, its mount and its files stay.
func TestEgressForgedNetRecordIgnored(t *testing.T) {
	nettest.Guard(t)
	e := newRealEnv(t)
	ctx := context.Background()
	victim := filepath.Join(t.TempDir(), "victim")
	require.NoError(t, os.Mkdir(victim, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(victim, "under"), []byte("under"), 0o644))
	require.NoError(t, syscall.Mount("tmpfs", victim, "tmpfs", 0, "size=1m"))
	t.Cleanup(func() { _ = syscall.Unmount(victim, syscall.MNT_DETACH) })
	require.NoError(t, os.WriteFile(filepath.Join(victim, "inside"), []byte("inside"), 0o644))
	forged := "../.." + victim
	require.Equal(t, victim, filepath.Join("/run/netns", forged))
	forge := func(id string) string {
		t.Helper()
		path := filepath.Join(e.root, id, "net.json")
		data, err := json.Marshal(map[string]any{"mode": gvisor.NetworkSandbox, "name": forged, "netns": victim,
			"hostInterface": "cellosforged", "cellInterface": "eth0"})
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(path, data, 0o644))
		return path
	}
	intact := func(what string) {
		t.Helper()
		assert.Contains(t, mountedUnder(t, filepath.Dir(victim)), victim, "%s: the tmpfs is still mounted", what)
		data, err := os.ReadFile(filepath.Join(victim, "inside"))
		require.NoError(t, err, what)
		assert.Equal(t, "inside", string(data), what)
	}
	refusal := func(logs *observer.ObservedLogs, id, path string) {
		t.Helper()
		warned := logs.FilterMessageSnippet("refusing the bundle's network record").AllUntimed()
		require.Len(t, warned, 1, "%v", logs.AllUntimed())
		assert.Equal(t, zap.WarnLevel, warned[0].Level)
		assert.Equal(t, map[string]any{"cell": id, "file": path, "recorded": forged, "expected": gvisor.RunscID(e.root, id)}, warned[0].ContextMap())
	}
	other := func() (*gvisor.Backend, *observer.ObservedLogs) {
		t.Helper()
		core, logs := observer.New(zap.InfoLevel)
		b, err := gvisor.New(gvisor.WithBundleRoot(e.root), gvisor.WithLogger(zap.New(core)))
		require.NoError(t, err)
		t.Cleanup(func() { _ = b.Close(context.Background()) })
		return b, logs
	}

	// Destroy by a Backend that does not track the cell reads its bundle's record.
	h := e.create(sh("forged-destroy", "echo up; sleep 60"))
	require.Eventually(t, func() bool { return e.out(h.CellID).stdout.String() == "up\n" }, 30*time.Second, 10*time.Millisecond)
	path := forge(h.CellID)
	b, logs := other()
	rep, err := b.Destroy(ctx, cellos.CellHandle{CellID: h.CellID})
	require.NoError(t, err)
	assert.True(t, rep.Destroyed)
	refusal(logs, h.CellID, path)
	assert.Empty(t, logs.FilterMessage("cell network removed").AllUntimed())
	intact("Destroy")
	_, _ = e.b.Destroy(ctx, h) // forget it here; nothing is left to remove

	// Recover by a new Backend, after the cell exited.
	st, err := e.run(sh("forged-recover", "true"))
	require.NoError(t, err)
	assert.Equal(t, 0, st.Code)
	path = forge("forged-recover")
	b, logs = other()
	rrep, err := b.Recover(ctx)
	require.NoError(t, err)
	assert.Equal(t, []string{"forged-recover"}, append(rrep.Adopted, rrep.Cleaned...))
	refusal(logs, "forged-recover", path)
	n, err := b.NetworkOf("forged-recover")
	if err == nil {
		assert.Nil(t, n, "no network from a refused record")
	}
	rep, err = b.Destroy(ctx, cellos.CellHandle{CellID: "forged-recover"})
	require.NoError(t, err)
	assert.True(t, rep.Destroyed)
	intact("Recover")
	_, _ = e.b.Destroy(ctx, cellos.CellHandle{CellID: "forged-recover"})
	data, err := os.ReadFile(filepath.Join(victim, "inside"))
	require.NoError(t, err)
	assert.Equal(t, "inside", string(data))
	require.NoError(t, syscall.Unmount(victim, syscall.MNT_DETACH))
	data, err = os.ReadFile(filepath.Join(victim, "under"))
	require.NoError(t, err)
	assert.Equal(t, "under", string(data), "the directory's own file, under the mount")
}

// The supervisor of TestEgressSupervisorKilledThenRecover is this test binary, re-executed (as
// in crash_test.go): it creates two cells with egress rules and waits to be killed.
const netSupervisorEnv = "CELLOS_TEST_NET_SUPERVISOR"

func TestHelperNetSupervisor(t *testing.T) {
	if os.Getenv(netSupervisorEnv) == "" {
		return
	}
	opts := []gvisor.Option{gvisor.WithBundleRoot(os.Getenv("CELLOS_TEST_ROOT")), gvisor.WithCellNetwork(nettest.CellPool.String())}
	if os.Getenv(netSupervisorEnv) == gvisor.NetworkHost {
		opts = append(opts, gvisor.WithHostStackNetworking(true))
	}
	b, err := gvisor.New(opts...)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	for _, id := range []string{"net-adopted", "net-orphaned"} {
		if _, err := b.Create(context.Background(), egressDoc(id, tcp("198.51.100.2", 8080))); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
	}
	fmt.Println("ready")
	select {} // until killed
}

// TestEgressSupervisorKilledThenRecover: the supervisor is SIGKILLed with two networked cells;
// one cell's shim dies too. Recover adopts the first (its rules stay in force, its handle says
// so) and cleans the second, network included; Destroy of the adopted one leaves the host as it
// was.
func TestEgressSupervisorKilledThenRecover(t *testing.T) {
	e, mode := newEgressEnv(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperNetSupervisor$", "-test.count=1")
	cmd.Env = append(os.Environ(), netSupervisorEnv+"="+mode, "CELLOS_TEST_ROOT="+e.root)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr syncBuffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	line, _ := bufio.NewReader(out).ReadString('\n')
	require.Equal(t, "ready\n", line, "supervisor stderr: %s", stderr.String())
	for _, id := range []string{"net-adopted", "net-orphaned"} {
		t.Cleanup(func() { _, _ = e.b.Destroy(context.Background(), cellos.CellHandle{CellID: id}) }) // should the test fail early
		// The cells run: a shim killed while runsc is still starting the sandbox is another story
		// (its runsc goes on starting it after a forced delete).
		require.Eventually(t, func() bool {
			data, _ := os.ReadFile(filepath.Join(e.root, id, "stdout.log"))
			return string(data) == "up\n"
		}, 60*time.Second, 10*time.Millisecond, "%s never started", id)
	}
	require.NoError(t, syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL))
	_ = cmd.Wait()

	orphan := shimPid(t, filepath.Join(e.root, "net-orphaned"))
	require.NotZero(t, orphan)
	require.NoError(t, syscall.Kill(orphan, syscall.SIGKILL))
	rules := nettest.Run(t, "nft", "list", "table", "inet", "cellos")
	for _, id := range []string{"net-adopted", "net-orphaned"} {
		var rec struct {
			HostInterface string `json:"hostInterface"`
			Netns         string `json:"netns"`
		}
		data, err := os.ReadFile(filepath.Join(e.root, id, "net.json"))
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(data, &rec))
		assert.Contains(t, rules, rec.HostInterface, "%s's rules outlive its supervisor", id)
		assert.FileExists(t, rec.Netns)
	}

	rep, err := e.b.Recover(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []string{"net-adopted"}, rep.Adopted)
	assert.Equal(t, []string{"net-orphaned"}, rep.Cleaned)
	n, err := e.b.NetworkOf("net-adopted")
	require.NoError(t, err)
	require.NotNil(t, n, "the adopted cell's network is known again")
	assert.Equal(t, mode, n.Mode)
	rules = nettest.Run(t, "nft", "list", "table", "inet", "cellos")
	assert.Contains(t, rules, n.HostInterface)
	assert.Equal(t, 1, strings.Count(rules, "jump cellos"), "only the adopted cell's chain is left:\n%s", rules)
	e.destroy(cellos.CellHandle{CellID: "net-adopted"})
	assert.Empty(t, e.leftovers())
	_, err = exec.Command("nft", "list", "table", "inet", "cellos").CombinedOutput()
	assert.Error(t, err, "the table goes with the last cell")
}

// BenchmarkEgressCellOverhead measures what egress rules add to a cell's life: Create (the
// cell's network: namespace, veth pair, addresses, one nft batch) and Destroy (one nft batch,
// the veth pair, the namespace), against the same /bin/true cell without rules, alternating so
// that both see the same machine load. It reports medians of Create, of Create to the exit seen
// by WaitForExit, and of Destroy. Root only:
//
//	CELLOS_GVISOR_RUNSC_BIN=$PWD/.cache/runsc-current/runsc go test -run '^$' -bench EgressCellOverhead -benchtime 21x .
func BenchmarkEgressCellOverhead(b *testing.B) {
	nettest.Need(b)
	nettest.Lock(b)
	before := nettest.Snapshot(b)
	b.Cleanup(func() { nettest.RequireUnchanged(b, before) })
	requireRunsc(b)
	opts := []gvisor.Option{gvisor.WithBundleRoot(b.TempDir()), gvisor.WithCellNetwork(nettest.CellPool.String())}
	probe, err := gvisor.New(opts...)
	require.NoError(b, err)
	if _, err := probe.EgressMode(context.Background()); err != nil {
		opts = append(opts, gvisor.WithHostStackNetworking(true))
	}
	be, err := gvisor.New(opts...)
	require.NoError(b, err)
	ctx := context.Background()
	var createPlain, createEgress, runPlain, runEgress, destroyPlain, destroyEgress []time.Duration
	one := func(id string, egress bool) {
		d := doc(id, "/bin/true")
		if egress {
			d.Spec.Network = &cellos.NetworkSpec{Egress: []cellos.EgressRule{tcp("198.51.100.2", 8080), udp("198.51.100.2", 53)}}
		}
		start := time.Now()
		h, err := be.Create(ctx, d)
		require.NoError(b, err)
		created := time.Since(start)
		_, err = be.WaitForExit(ctx, id)
		require.NoError(b, err)
		ran := time.Since(start)
		start = time.Now()
		rep, err := be.Destroy(ctx, h)
		require.NoError(b, err)
		require.True(b, rep.Destroyed)
		if egress {
			createEgress, runEgress, destroyEgress = append(createEgress, created), append(runEgress, ran), append(destroyEgress, time.Since(start))
		} else {
			createPlain, runPlain, destroyPlain = append(createPlain, created), append(runPlain, ran), append(destroyPlain, time.Since(start))
		}
	}
	one("warm-up", true) // the first cell with egress rules probes runsc's networking
	for i := 0; b.Loop(); i++ {
		one(fmt.Sprintf("plain-%d", i), false)
		one(fmt.Sprintf("egress-%d", i), true)
	}
	median := func(ds []time.Duration) float64 {
		s := append([]time.Duration(nil), ds...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return float64(s[len(s)/2].Microseconds()) / 1000
	}
	b.ReportMetric(median(createPlain), "create-plain-ms")
	b.ReportMetric(median(createEgress), "create-egress-ms")
	b.ReportMetric(median(runPlain), "exited-plain-ms")
	b.ReportMetric(median(runEgress), "exited-egress-ms")
	b.ReportMetric(median(destroyPlain), "destroy-plain-ms")
	b.ReportMetric(median(destroyEgress), "destroy-egress-ms")
}
