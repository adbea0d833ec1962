package netcell

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/internal/nettest"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func TestNetworkFreeSlot(t *testing.T) {
	pool := pfx("10.77.0.0/28") // four /30s
	claims := func(ps ...string) []claim {
		var out []claim
		for _, p := range ps {
			out = append(out, claim{prefix: pfx(p)})
		}
		return out
	}
	guard := func(p string) claim { return claim{prefix: pfx(p), guard: true} }
	for _, tc := range []struct {
		claims []claim
		want   string // "" for none free
	}{
		{nil, "10.77.0.0/30"},
		{claims("10.77.0.1/32", "10.77.0.0/30"), "10.77.0.4/30"},
		{claims("10.77.0.6/32"), "10.77.0.0/30"},
		{claims("10.77.0.0/29"), "10.77.0.8/30"},
		{claims("10.0.0.0/8"), ""}, // the host routes all of it elsewhere
		{claims("10.77.0.0/30", "10.77.0.13/32", "10.77.0.4/31", "10.77.0.9/32"), ""},
		{claims("192.0.2.0/24", "10.78.0.0/16"), "10.77.0.0/30"}, // outside the pool
		// A leak guard covering the /30 is overridden by the /30's own route...
		{[]claim{guard("10.0.0.0/8")}, "10.77.0.0/30"},
		{[]claim{guard("10.77.0.0/28"), guard("10.77.0.0/29")}, "10.77.0.0/30"},
		// ...but one at least as specific as the /30 would take (part of) it.
		{[]claim{guard("10.77.0.0/30"), guard("10.77.0.5/32"), guard("10.77.0.0/8")}, "10.77.0.8/30"},
		{[]claim{guard("10.0.0.0/8"), {prefix: pfx("10.77.0.0/29")}}, "10.77.0.8/30"},
	} {
		got, ok := freeSlot(pool, tc.claims)
		require.Equal(t, tc.want != "", ok, "%v", tc.claims)
		if ok {
			assert.Equal(t, tc.want, got.String(), "%v", tc.claims)
		}
	}
	got, ok := freeSlot(pfx("198.51.100.252/30"), nil)
	require.True(t, ok)
	assert.Equal(t, "198.51.100.252/30", got.String())
	got, ok = freeSlot(pfx("10.0.0.0/8"), claims("10.0.0.0/9"))
	require.True(t, ok)
	assert.Equal(t, "10.128.0.0/30", got.String())
}

// Which of the host's addresses and routes claim a cell's /30.
func TestNetworkClaims(t *testing.T) {
	const main, local, other = unix.RT_TABLE_MAIN, unix.RT_TABLE_LOCAL, 100
	pool := pfx("10.77.0.0/16")
	for _, tc := range []struct {
		name  string
		n     hostNet
		want  string // the first free /30; "" for none
		guard bool   // the claim in the pool is a guard
	}{
		{name: "nothing", want: "10.77.0.0/30"},
		{name: "an address's /32 and its network", n: hostNet{addrs: []ifAddr{{pfx("10.77.0.1/29"), "eth1"}, {pfx("10.77.0.9/32"), "lo"}}}, want: "10.77.0.12/30"},
		{name: "an address whose network covers the pool", n: hostNet{addrs: []ifAddr{{pfx("10.1.2.3/8"), "eth1"}}}},
		{name: "a default route says nothing", n: hostNet{routes: []route{{pfx("0.0.0.0/0"), unix.RTN_UNICAST, main}, {pfx("0.0.0.0/0"), unix.RTN_UNREACHABLE, other}}}, want: "10.77.0.0/30"},
		{name: "unreachable covering the pool", n: hostNet{routes: []route{{pfx("10.0.0.0/8"), unix.RTN_UNREACHABLE, main}}}, want: "10.77.0.0/30", guard: true},
		{name: "blackhole equal to the pool", n: hostNet{routes: []route{{pfx("10.77.0.0/16"), unix.RTN_BLACKHOLE, main}}}, want: "10.77.0.0/30", guard: true},
		{name: "prohibit covering the first /30s", n: hostNet{routes: []route{{pfx("10.77.0.0/29"), unix.RTN_PROHIBIT, main}}}, want: "10.77.0.0/30", guard: true},
		{name: "a guard as specific as a /30", n: hostNet{routes: []route{{pfx("10.77.0.0/30"), unix.RTN_BLACKHOLE, main}, {pfx("10.77.0.4/32"), unix.RTN_UNREACHABLE, main}}}, want: "10.77.0.8/30", guard: true},
		{name: "a guard in another table may be consulted first", n: hostNet{routes: []route{{pfx("10.0.0.0/8"), unix.RTN_UNREACHABLE, other}}}},
		{name: "a unicast route covering the pool routes it elsewhere", n: hostNet{routes: []route{{pfx("10.0.0.0/8"), unix.RTN_UNICAST, main}}}},
		{name: "a unicast route inside the pool", n: hostNet{routes: []route{{pfx("10.77.0.0/31"), unix.RTN_UNICAST, other}}}, want: "10.77.0.4/30"},
		{name: "a local route covering the pool: the host's own", n: hostNet{routes: []route{{pfx("10.77.0.0/16"), unix.RTN_LOCAL, local}}}},
		{name: "a throw route is no guard", n: hostNet{routes: []route{{pfx("10.0.0.0/8"), unix.RTN_THROW, main}}}},
		{name: "another cell's link", n: hostNet{
			addrs:  []ifAddr{{pfx("10.77.0.1/30"), "cellos0123456789"}},
			routes: []route{{pfx("10.77.0.0/30"), unix.RTN_UNICAST, main}, {pfx("10.77.0.1/32"), unix.RTN_LOCAL, local}, {pfx("10.77.0.3/32"), unix.RTN_BROADCAST, local}, {pfx("10.0.0.0/8"), unix.RTN_UNREACHABLE, main}},
		}, want: "10.77.0.4/30", guard: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := freeSlot(pool, tc.n.claims())
			require.Equal(t, tc.want != "", ok, "%+v", tc.n)
			if ok {
				assert.Equal(t, tc.want, got.String())
			}
			guards := 0
			for _, c := range tc.n.claims() {
				if c.guard {
					guards++
				}
			}
			assert.Equal(t, tc.guard, guards > 0)
		})
	}
}

func TestNetworkHostAddrs(t *testing.T) {
	n := hostNet{
		addrs: []ifAddr{{pfx("127.0.0.1/8"), "lo"}, {pfx("192.0.2.2/24"), "eth0"}, {pfx("192.0.2.7/24"), "eth0:1"}},
		routes: []route{
			{pfx("192.0.2.0/24"), unix.RTN_UNICAST, unix.RT_TABLE_MAIN},
			{pfx("127.0.0.0/8"), unix.RTN_LOCAL, unix.RT_TABLE_LOCAL},
			{pfx("192.0.2.2/32"), unix.RTN_LOCAL, unix.RT_TABLE_LOCAL}, // the address again
			{pfx("192.0.2.255/32"), unix.RTN_BROADCAST, unix.RT_TABLE_LOCAL},
			{pfx("203.0.113.0/28"), unix.RTN_LOCAL, 100}, // AnyIP
			{pfx("0.0.0.0/0"), unix.RTN_LOCAL, 100},      // TPROXY's
		},
	}
	var got []string
	for _, a := range n.hostAddrs() {
		got = append(got, a.String())
	}
	assert.Equal(t, []string{"127.0.0.1 (lo)", "192.0.2.2 (eth0)", "192.0.2.7 (eth0:1)", "127.0.0.0/8 (a local route of table 255)",
		"203.0.113.0/28 (a local route of table 100)"}, got)

	// The real host's: loopback at least, each as a prefix.
	host, err := HostAddrs()
	require.NoError(t, err)
	assert.Contains(t, host, HostAddr{Prefix: pfx("127.0.0.1/32"), Where: "lo"})
}

func TestNetworkRuleRefusal(t *testing.T) {
	pool := pfx("10.77.0.0/16")
	host := []HostAddr{{pfx("127.0.0.1/32"), "lo"}, {pfx("192.0.2.2/32"), "eth0"}, {pfx("172.17.0.1/32"), "docker0"},
		{pfx("10.1.0.1/32"), "wg0"}, {pfx("10.2.0.1/32"), "wg1"}, {pfx("10.3.0.1/32"), "wg2"}, {pfx("203.0.113.0/28"), "a local route of table 100"}}
	for _, tc := range []struct {
		cidr string
		want []string // substrings of the reason; none: allowed
	}{
		{"203.0.113.64/26", nil},
		{"198.51.100.7/32", nil},
		{"169.254.169.254/32", nil}, // named exactly: meant
		{"127.0.0.1/32", nil},
		{"192.0.2.2/32", nil},
		{"172.17.0.1/32", nil},
		{"0.0.0.0/0", []string{"would reach 169.254.0.0/16 (link-local: clouds serve instance metadata", "127.0.0.0/8 (loopback: the host's own services)",
			"this host's own addresses 192.0.2.2 (eth0), 172.17.0.1 (docker0), 10.1.0.1 (wg0) and 3 more",
			"and the cell network 10.77.0.0/16", `as a /32 (e.g. "169.254.169.254/32")`, "no rule reaches the cell network", "narrow the cidr"}},
		{"169.254.0.0/16", []string{"would reach 169.254.0.0/16", `e.g. "169.254.169.254/32"`}},
		{"169.254.169.0/24", []string{"would reach 169.254.0.0/16"}},
		{"127.0.0.0/8", []string{"127.0.0.0/8 (loopback", `"127.0.0.1/32"`}},
		{"192.0.2.0/24", []string{"would reach this host's own address 192.0.2.2 (eth0)", `"192.0.2.2/32"`}},
		{"192.0.2.2/31", []string{"192.0.2.2 (eth0)"}},
		{"203.0.113.0/24", []string{"203.0.113.0/28 (a local route of table 100)", `"203.0.113.0/32"`}},
		{"10.77.0.0/16", []string{"is inside the cell network 10.77.0.0/16", "which no rule can open"}},
		{"10.77.3.1/32", []string{"is inside the cell network"}},
		{"10.64.0.0/10", []string{"would reach the cell network 10.77.0.0/16 (other cells, and this host through their gateways), which no rule can open"}},
	} {
		reason := RuleRefusal(pfx(tc.cidr), pool, host)
		if tc.want == nil {
			assert.Empty(t, reason, tc.cidr)
			continue
		}
		for _, w := range tc.want {
			assert.Contains(t, reason, w, tc.cidr)
		}
	}
	// Without the host and the pool: what any host refuses.
	assert.Empty(t, RuleRefusal(pfx("192.0.2.0/24"), netip.Prefix{}, nil))
	assert.NotEmpty(t, RuleRefusal(pfx("0.0.0.0/0"), netip.Prefix{}, nil))
	assert.NotContains(t, RuleRefusal(pfx("0.0.0.0/0"), netip.Prefix{}, nil), "cell network")

	// Setup refuses them too, before it takes the lock or touches anything.
	_, err := Setup(context.Background(), Spec{Name: "x", Pool: pool, Rules: []Rule{{pfx("198.51.100.7/32"), 80, "tcp"}, {pfx("0.0.0.0/0"), 80, "tcp"}}},
		func(*Cell) error { t.Fatal("recorded"); return nil })
	var re *RuleError
	require.ErrorAs(t, err, &re)
	assert.Equal(t, 1, re.Index)
	assert.Contains(t, re.Reason, "169.254.0.0/16")
}

// Names that are not plain never reach outside NetnsDir.
func TestNetworkBadNamesRefused(t *testing.T) {
	for _, bad := range []string{"", ".", "..", "../../x", "../x", "a/b", "/x", ".hidden", "x\x00y", "a b", strings.Repeat("a", 65), "x/../../y"} {
		require.Error(t, CheckName(bad), "%q", bad)
		require.Error(t, Teardown(bad), "%q", bad)
		assert.False(t, Exists(bad), "%q", bad)
		_, err := NetnsPath(bad)
		require.Error(t, err, "%q", bad)
		_, err = Setup(context.Background(), Spec{Name: bad, Pool: pfx("10.77.0.0/16")}, func(*Cell) error { t.Fatal("recorded"); return nil })
		require.Error(t, err, "%q", bad)
	}
	for _, bad := range []string{"/run/netns/../../x", "/run/netns/..", "/run/netns/.hidden", "/run/netns/", "/run/netns/" + strings.Repeat("a", 65),
		"netns", "relative/netns", "/tmp/../run/netns/x", "/tmp//x", ""} {
		require.Error(t, RemoveNetns(bad), "%q", bad)
		require.Error(t, CreateNetns(bad), "%q", bad)
	}
	for _, good := range []string{"cellos-0123456789abcdef01234567", "a", "a.b_c-D", strings.Repeat("a", 64)} {
		require.NoError(t, CheckName(good))
		p, err := NetnsPath(good)
		require.NoError(t, err)
		assert.Equal(t, NetnsDir+"/"+good, p)
	}
}

// removeNetns unmounts network namespaces only: whatever else is at the path stays.
func TestNetworkRemoveNetnsLeavesOtherMounts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	dir := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "under"), []byte("x"), 0o644))
	require.NoError(t, unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"))
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	require.NoError(t, os.WriteFile(filepath.Join(dir, "inside"), []byte("y"), 0o644))
	err := removeNetns(dir)
	require.ErrorContains(t, err, "not a namespace's mount point")
	assert.FileExists(t, filepath.Join(dir, "inside"), "the tmpfs is still mounted")

	// A file with another file system bound on it is not unmounted either.
	file := filepath.Join(t.TempDir(), "file")
	require.NoError(t, os.WriteFile(file, nil, 0o444))
	require.NoError(t, unix.Mount(filepath.Join(dir, "inside"), file, "", unix.MS_BIND, ""))
	t.Cleanup(func() { _ = unix.Unmount(file, unix.MNT_DETACH) })
	require.Error(t, removeNetns(file))
	data, err := os.ReadFile(file)
	require.NoError(t, err)
	assert.Equal(t, "y", string(data), "still bound")
	// Nor is a file with contents removed.
	require.Error(t, RemoveNetns(filepath.Join(dir, "inside")))
	assert.FileExists(t, filepath.Join(dir, "inside"))

	// A namespace pinned twice, as a sandbox's copy may stack it, is unpinned and removed.
	ns := filepath.Join(t.TempDir(), "ns")
	require.NoError(t, CreateNetns(ns))
	require.NoError(t, unix.Mount(ns, ns, "", unix.MS_BIND, ""))
	require.NoError(t, RemoveNetns(ns))
	assert.NoFileExists(t, ns)
}

func TestNetworkNames(t *testing.T) {
	a, b := HostIfName("cellos-0123456789abcdef01234567"), HostIfName("cellos-0123456789abcdef01234568")
	assert.Len(t, a, 15)
	assert.True(t, strings.HasPrefix(a, IfPrefix))
	assert.NotEqual(t, a, b)
	p, err := NetnsPath("x")
	require.NoError(t, err)
	assert.Equal(t, "/run/netns/x", p)
	require.NoError(t, CheckIfName("eth0"))
	require.NoError(t, CheckIfName("enp0s31f6.100"))
	for _, bad := range []string{"", "a b", `a"b`, "0123456789abcdef", "a/b", "..", "eth0;x"} {
		assert.Error(t, CheckIfName(bad), "%q", bad)
	}
	require.NoError(t, CheckPool(pfx("10.77.0.0/16")))
	for _, bad := range []string{"10.77.0.1/16", "10.77.0.0/31", "0.0.0.0/0", "2001:db8::/64"} {
		assert.Error(t, CheckPool(pfx(bad)), bad)
	}
}

func TestNetworkSetupBatch(t *testing.T) {
	c := &Cell{HostIf: "cellosabcdef012", Pool: pfx("10.77.0.0/16"), Rules: []Rule{
		{pfx("203.0.113.0/24"), 443, "tcp"}, {pfx("198.51.100.7/32"), 53, "udp"}, {pfx("203.0.113.0/24"), 443, "tcp"},
		{pfx("169.254.169.254/32"), 80, "tcp"},
	}}
	batch := setupBatch(c)
	for _, want := range []string{
		"add chain inet cellos forward { type filter hook forward priority filter ; policy accept ; }\nflush chain inet cellos forward\n" +
			"add rule inet cellos forward ct state established,related accept\n" +
			"add rule inet cellos forward oifname \"cellos*\" reject with icmpx type admin-prohibited\n" +
			"add rule inet cellos forward iifname vmap @egress\n" +
			"add rule inet cellos forward iifname \"cellos*\" reject with icmpx type admin-prohibited\n",
		"add rule inet cellos input iifname vmap @egress\n",
		"add rule inet cellos output oifname \"cellos*\" reject with icmpx type admin-prohibited\n",
		// The cell network first; single addresses before the guards, wider rules after them.
		"add chain inet cellos cellosabcdef012\nflush chain inet cellos cellosabcdef012\n" +
			"add rule inet cellos cellosabcdef012 ip daddr 10.77.0.0/16 reject with icmpx type admin-prohibited\n" +
			"add rule inet cellos cellosabcdef012 ip daddr 198.51.100.7/32 udp dport 53 ct state new accept\n" +
			"add rule inet cellos cellosabcdef012 ip daddr 169.254.169.254/32 tcp dport 80 ct state new accept\n" +
			"add rule inet cellos cellosabcdef012 ip daddr { 127.0.0.0/8, 169.254.0.0/16 } reject with icmpx type admin-prohibited\n" +
			"add rule inet cellos cellosabcdef012 fib daddr type { local, broadcast, multicast } reject with icmpx type admin-prohibited\n" +
			"add rule inet cellos cellosabcdef012 ip daddr 203.0.113.0/24 tcp dport 443 ct state new accept\n" +
			"add rule inet cellos cellosabcdef012 reject with icmpx type admin-prohibited\n" +
			"add element inet cellos egress { \"cellosabcdef012\" : jump cellosabcdef012 }\n",
	} {
		assert.Contains(t, batch, want)
	}
	assert.Equal(t, 1, strings.Count(batch, "tcp dport 443"), "repeated rules are dropped")
	assert.NotContains(t, batch, "postrouting", "no nat chain without an uplink")
	assert.NotContains(t, batch, "saddr", "rules never match on the source address")

	c.Uplink = "eth0"
	batch = setupBatch(c)
	assert.Contains(t, batch, "add chain inet cellos postrouting { type nat hook postrouting priority srcnat ; policy accept ; }\n"+
		"flush chain inet cellos postrouting\nadd rule inet cellos postrouting iifname vmap @egress_nat\n")
	assert.Contains(t, batch, "add rule inet cellos cellosabcdef012-nat oifname \"eth0\" masquerade\n"+
		"add element inet cellos egress_nat { \"cellosabcdef012\" : jump cellosabcdef012-nat }\n")
}

// needHost skips unless the test may change the host's network (root, nft, ip) and guards the
// host's state: exactly as before at the end.
func needHost(t *testing.T) {
	t.Helper()
	nettest.Guard(t)
}

func TestNetworkSetupTeardownLeavesHostAsBefore(t *testing.T) {
	needHost(t)
	var recorded []*Cell
	record := func(c *Cell) error { cp := *c; recorded = append(recorded, &cp); return nil }
	spec := Spec{Name: "cellos-test-netcell-a", Pool: nettest.CellPool,
		Rules: []Rule{{pfx("198.51.100.2/32"), 8080, "tcp"}}}
	start := time.Now()
	a, err := Setup(context.Background(), spec, record)
	require.NoError(t, err)
	t.Logf("setup took %v", time.Since(start))
	t.Cleanup(func() { _ = Teardown(a.Name) })
	require.Len(t, recorded, 1)
	assert.Equal(t, *recorded[0], *a)
	assert.Equal(t, "198.51.100.129/30", a.HostAddr.String())
	assert.Equal(t, "198.51.100.130/30", a.CellAddr.String())
	assert.FileExists(t, a.Netns)
	assert.True(t, Exists(a.Name))

	out := nettest.Run(t, "ip", "-o", "addr", "show", "dev", a.HostIf)
	assert.Contains(t, out, "inet 198.51.100.129/30")
	assert.NotContains(t, out, "inet6", "no IPv6 on the cell's link")
	v, err := ReadSysctl("net/ipv4/conf/" + a.HostIf + "/forwarding")
	require.NoError(t, err)
	assert.Equal(t, "1", v, "forwarding on the cell's veth")
	v, _ = ReadSysctl("net/ipv4/conf/" + a.HostIf + "/rp_filter")
	assert.Equal(t, "1", v, "strict reverse-path filtering on the cell's veth")
	v, _ = ReadSysctl("net/ipv4/conf/all/forwarding")
	assert.Equal(t, "0", v, "never global forwarding (the host had it off)")
	inside := nettest.Run(t, "ip", "-n", a.Name, "-o", "addr")
	assert.Contains(t, inside, "eth0    inet 198.51.100.130/30")
	assert.NotContains(t, inside, "inet6 fe80", "no IPv6 inside")
	assert.Contains(t, nettest.Run(t, "ip", "-n", a.Name, "route"), "default via 198.51.100.129 dev eth0")
	rules := nettest.Run(t, "nft", "list", "table", "inet", "cellos")
	assert.Contains(t, rules, "ip daddr 198.51.100.2 tcp dport 8080 ct state new accept\n"+
		"\t\tip daddr { 127.0.0.0/8, 169.254.0.0/16 } reject with icmpx admin-prohibited\n"+
		"\t\tfib daddr type { local, broadcast, multicast } reject with icmpx admin-prohibited\n")
	assert.Contains(t, rules, `"`+a.HostIf+`" : jump `+a.HostIf)

	// A second cell takes the next /30; the table stays until both are gone.
	b, err := Setup(context.Background(), Spec{Name: "cellos-test-netcell-b", Pool: nettest.CellPool, Uplink: "lo"}, record)
	require.NoError(t, err)
	t.Cleanup(func() { _ = Teardown(b.Name) })
	assert.Equal(t, "198.51.100.133/30", b.HostAddr.String())
	rules = nettest.Run(t, "nft", "list", "table", "inet", "cellos")
	assert.Contains(t, rules, `oifname "lo" masquerade`)

	// The same name twice is refused.
	_, err = Setup(context.Background(), spec, record)
	require.ErrorIs(t, err, ErrExists)

	start = time.Now()
	require.NoError(t, Teardown(a.Name))
	t.Logf("teardown took %v", time.Since(start))
	require.NoError(t, Teardown(a.Name), "idempotent")
	assert.NoFileExists(t, a.Netns)
	rules = nettest.Run(t, "nft", "list", "table", "inet", "cellos")
	assert.NotContains(t, rules, a.HostIf)
	assert.Contains(t, rules, b.HostIf)

	// The freed /30 is taken again.
	c, err := Setup(context.Background(), Spec{Name: "cellos-test-netcell-c", Pool: nettest.CellPool}, record)
	require.NoError(t, err)
	assert.Equal(t, "198.51.100.129/30", c.HostAddr.String())
	require.NoError(t, Teardown(c.Name))
	require.NoError(t, Teardown(b.Name))
	_, err = exec.Command("nft", "list", "table", "inet", "cellos").CombinedOutput()
	assert.Error(t, err, "the table goes with the last cell")
}

func TestNetworkSkipsAddressesInUse(t *testing.T) {
	needHost(t)
	// An address of the host inside the pool (another Backend's cell, or the operator's).
	h := nettest.NewHost(t, 0)
	pool := pfx("198.51.100.0/29") // two /30s; test host 0 holds the first
	c, err := Setup(context.Background(), Spec{Name: "cellos-test-netcell-d", Pool: pool}, func(*Cell) error { return nil })
	require.NoError(t, err)
	t.Cleanup(func() { _ = Teardown(c.Name) })
	assert.Equal(t, "198.51.100.5/30", c.HostAddr.String(), "next to %s", h.Gateway)
	_, err = Setup(context.Background(), Spec{Name: "cellos-test-netcell-e", Pool: pool}, func(*Cell) error { return nil })
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no free /30")
	require.NoError(t, Teardown(c.Name))
}

// A leak guard covering the cell network (an unreachable, blackhole or prohibit route of the
// main table) leaves it usable: the cell's /30 route is more specific. A unicast route covering
// it, or a guard in another table, still takes it.
func TestNetworkGuardRoutesLeavePoolUsable(t *testing.T) {
	needHost(t)
	h0 := nettest.NewHost(t, 0)
	h0.ServeTCP(8080)
	pool := nettest.CellPool.String()
	route := func(args ...string) {
		t.Helper()
		nettest.Run(t, "ip", append([]string{"route", "add"}, args...)...)
		t.Cleanup(func() { _ = exec.Command("ip", append([]string{"route", "del"}, args...)...).Run() })
	}
	for _, typ := range []string{"unreachable", "blackhole", "prohibit"} {
		route(typ, pool)
		c, err := Setup(context.Background(), Spec{Name: "cellos-test-netcell-" + typ, Pool: nettest.CellPool,
			Rules: []Rule{{pfx(h0.Addr.String() + "/32"), 8080, "tcp"}}}, func(*Cell) error { return nil })
		require.NoError(t, err, typ)
		assert.Equal(t, "198.51.100.129/30", c.HostAddr.String(), typ)
		assert.Contains(t, nettest.Run(t, "ip", "route", "get", c.CellAddr.Addr().String()), "dev "+c.HostIf, typ)
		var got string
		err = nettest.InNetns(c.Netns, func() error {
			conn, err := net.DialTimeout("tcp4", netip.AddrPortFrom(h0.Addr, 8080).String(), 3*time.Second)
			if err == nil {
				_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
				buf := make([]byte, 64)
				n, _ := conn.Read(buf)
				got = string(buf[:n])
				_ = conn.Close()
			}
			return err
		})
		require.NoError(t, err, "%s: the cell's traffic and its replies pass", typ)
		assert.Equal(t, "hello 8080\n", got)
		require.NoError(t, Teardown(c.Name))
		nettest.Run(t, "ip", "route", "del", typ, pool)
	}
	assert.Len(t, h0.Conns(8080), 3)

	for _, args := range [][]string{{pool, "via", h0.Addr.String()}, {"unreachable", pool, "table", "100"}} {
		route(args...)
		_, err := Setup(context.Background(), Spec{Name: "cellos-test-netcell-taken", Pool: nettest.CellPool}, func(*Cell) error { return nil })
		require.ErrorContains(t, err, "no free /30", "%v", args)
		assert.False(t, Exists("cellos-test-netcell-taken"))
		nettest.Run(t, "ip", append([]string{"route", "del"}, args...)...)
	}
}

// A rule reaches an address of the host only when it names that address as a /32: a wider rule
// is refused while the host has an address in it, and an address the host gains later inside a
// wider rule is refused at packet time.
func TestNetworkRulesDoNotReachTheHost(t *testing.T) {
	needHost(t)
	h0 := nettest.NewHost(t, 0) // the host's 198.51.100.1, test host 198.51.100.2
	noRecord := func(*Cell) error { return nil }
	_, err := Setup(context.Background(), Spec{Name: "cellos-test-netcell-wide", Pool: nettest.CellPool,
		Rules: []Rule{{pfx("198.51.100.0/29"), 18081, "tcp"}}}, noRecord)
	var re *RuleError
	require.ErrorAs(t, err, &re)
	assert.Contains(t, re.Reason, "198.51.100.1 ("+h0.Link+")")
	assert.Contains(t, re.Reason, `"198.51.100.1/32"`)
	assert.False(t, Exists("cellos-test-netcell-wide"))

	wide := pfx("198.51.100.32/27") // test host 8's link, not there yet
	c, err := Setup(context.Background(), Spec{Name: "cellos-test-netcell-h", Pool: nettest.CellPool,
		Rules: []Rule{{pfx(h0.Gateway.String() + "/32"), 18081, "tcp"}, {wide, 18082, "tcp"}}}, noRecord)
	require.NoError(t, err)
	t.Cleanup(func() { _ = Teardown(c.Name) })
	h8 := nettest.NewHost(t, 8) // the host gains 198.51.100.33, inside the wide rule
	h8.ServeTCP(18082)
	named := nettest.ListenHost(t, netip.AddrPortFrom(h0.Gateway, 18081))
	gained := nettest.ListenHost(t, netip.AddrPortFrom(h8.Gateway, 18082))
	dial := func(to netip.Addr, port uint16) error {
		return nettest.InNetns(c.Netns, func() error {
			conn, err := net.DialTimeout("tcp4", netip.AddrPortFrom(to, port).String(), 3*time.Second)
			if err == nil {
				_ = conn.Close()
			}
			return err
		})
	}
	require.NoError(t, dial(h0.Gateway, 18081), "a host address named as a /32")
	require.NoError(t, dial(h8.Addr, 18082), "the wide rule's destinations")
	err = dial(h8.Gateway, 18082)
	require.ErrorIs(t, err, unix.EHOSTUNREACH, "the host's address inside the wide rule")
	assert.Equal(t, []netip.Addr{c.CellAddr.Addr()}, named.Peers())
	assert.Empty(t, gained.Peers())
	assert.Equal(t, []netip.Addr{c.CellAddr.Addr()}, h8.Conns(18082))

	// Now that the host has an address in it, the wide rule is refused for a new cell.
	_, err = Setup(context.Background(), Spec{Name: "cellos-test-netcell-i", Pool: nettest.CellPool, Rules: []Rule{{wide, 18082, "tcp"}}}, noRecord)
	require.ErrorAs(t, err, &re)
	assert.Contains(t, re.Reason, "198.51.100.33 ("+h8.Link+")")
	require.NoError(t, Teardown(c.Name))
}

func TestNetworkSetupFailureLeavesNothing(t *testing.T) {
	needHost(t)
	_, err := Setup(context.Background(), Spec{Name: "cellos-test-netcell-f", Pool: nettest.CellPool},
		func(*Cell) error { return errors.New("disk full") })
	require.ErrorContains(t, err, "disk full")
	assert.False(t, Exists("cellos-test-netcell-f"))

	// nft fails after the namespace and the veth pair exist: they are removed.
	bin := t.TempDir()
	require.NoError(t, os.WriteFile(bin+"/nft", []byte("#!/bin/sh\necho 'nft: refused' >&2\nexit 1\n"), 0o755))
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	_, err = Setup(context.Background(), Spec{Name: "cellos-test-netcell-g", Pool: nettest.CellPool}, func(*Cell) error { return nil })
	require.ErrorContains(t, err, "nft: refused")
	assert.False(t, Exists("cellos-test-netcell-g"))
	h, err := newHostHandle()
	require.NoError(t, err)
	defer h.Close()
	found, err := linkExists(h, HostIfName("cellos-test-netcell-g"))
	require.NoError(t, err)
	assert.False(t, found)
}

// BenchmarkSetupTeardown measures what a cell's network costs: Setup (namespace, veth pair,
// addresses, route, sysctls, one nft batch) and Teardown (one nft batch, the veth, the
// namespace). Root only: go test -run '^$' -bench SetupTeardown ./internal/netcell
func BenchmarkSetupTeardown(b *testing.B) {
	nettest.Guard(b)
	var setup, teardown time.Duration
	for i := 0; b.Loop(); i++ {
		start := time.Now()
		c, err := Setup(context.Background(), Spec{Name: "cellos-bench-netcell", Pool: nettest.CellPool,
			Rules: []Rule{{pfx("198.51.100.2/32"), 8080, "tcp"}, {pfx("198.51.100.6/32"), 53, "udp"}}}, func(*Cell) error { return nil })
		if err != nil {
			b.Fatal(err)
		}
		mid := time.Now()
		if err := Teardown(c.Name); err != nil {
			b.Fatal(err)
		}
		setup += mid.Sub(start)
		teardown += time.Since(mid)
	}
	b.ReportMetric(float64(setup.Microseconds())/float64(b.N)/1000, "setup-ms/op")
	b.ReportMetric(float64(teardown.Microseconds())/float64(b.N)/1000, "teardown-ms/op")
}
