package netcell

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// hostHandle is a netlink connection in the host's (the caller's) network namespace.
type hostHandle struct{ *netlink.Handle }

func newHostHandle() (hostHandle, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return hostHandle{}, fmt.Errorf("netlink: %w", err)
	}
	return hostHandle{h}, nil
}

func (h hostHandle) Close() { h.Handle.Close() }

// dumpRetries bounds retries of a netlink dump that the kernel interrupted (the table changed
// while it was being read).
const dumpRetries = 5

func linkExists(h hostHandle, name string) (bool, error) {
	_, err := h.LinkByName(name)
	var nf netlink.LinkNotFoundError
	switch {
	case err == nil:
		return true, nil
	case errors.As(err, &nf):
		return false, nil
	default:
		return false, fmt.Errorf("looking up interface %s: %w", name, err)
	}
}

// hostNet is what the host's own tables say about IPv4: its addresses, and its routes in every
// routing table.
type hostNet struct {
	addrs  []ifAddr
	routes []route
}

// ifAddr is an address of an interface, with its network's length (192.0.2.2/24).
type ifAddr struct {
	prefix netip.Prefix
	label  string // the interface's name, as `ip addr` labels the address
}

// route is a route of any table; a default route's dst is 0.0.0.0/0.
type route struct {
	dst   netip.Prefix
	typ   int // unix.RTN_*
	table int
}

func readHostNet(h hostHandle) (hostNet, error) {
	var addrs []netlink.Addr
	var routes []netlink.Route
	var err error
	for range dumpRetries {
		if addrs, err = h.AddrList(nil, netlink.FAMILY_V4); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return hostNet{}, fmt.Errorf("listing the host's addresses: %w", err)
	}
	for range dumpRetries {
		routes, err = h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return hostNet{}, fmt.Errorf("listing the host's routes: %w", err)
	}
	var n hostNet
	for _, a := range addrs {
		if p, ok := prefixOf(a.IPNet); ok {
			n.addrs = append(n.addrs, ifAddr{prefix: p, label: a.Label})
		}
	}
	for _, r := range routes {
		if p, ok := prefixOf(r.Dst); ok {
			n.routes = append(n.routes, route{dst: p.Masked(), typ: r.Type, table: r.Table})
		}
	}
	return n, nil
}

// prefixOf converts an IPv4 network (or an address with its network's length) to a prefix.
func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(n.IP.To4())
	ones, bits := n.Mask.Size()
	if !ok || bits != 32 {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(ip, ones), true
}

// claim is a range of addresses the host uses, which a cell's /30 must not overlap.
type claim struct {
	prefix netip.Prefix
	// guard: an unreachable, blackhole or prohibit route of the main table — a leak guard such
	// as `ip route add unreachable 10.0.0.0/8`. It stands only where nothing more specific is
	// routed, so a /30 it strictly contains is no conflict: the /30's connected route is more
	// specific and wins.
	guard bool
}

func (c claim) conflicts(slot netip.Prefix) bool {
	return c.prefix.Overlaps(slot) && (!c.guard || c.prefix.Bits() >= slot.Bits())
}

// claims lists the ranges of addresses the host uses: every address, as itself and as its
// network (the host reaches that network's neighbours on its interface), and every route but
// default ones, in every table. Any route that overlaps a /30 claims it, with one exception,
// guards (see claim): a unicast route covering the /30 says the operator routes that range
// somewhere — a VPN, a site network — and a /30 carved out of it would silently take four of
// its addresses away from them; a guard in a table other than main may be consulted before main
// (ip rule), where no longest-prefix match across tables would save the cell's route.
func (n hostNet) claims() []claim {
	var out []claim
	for _, a := range n.addrs {
		out = append(out, claim{prefix: netip.PrefixFrom(a.prefix.Addr(), 32)}, claim{prefix: a.prefix.Masked()})
	}
	for _, r := range n.routes {
		if r.dst.Bits() == 0 {
			continue // a default route covers everything and says nothing about use
		}
		guard := r.table == unix.RT_TABLE_MAIN && (r.typ == unix.RTN_UNREACHABLE || r.typ == unix.RTN_BLACKHOLE || r.typ == unix.RTN_PROHIBIT)
		out = append(out, claim{prefix: r.dst, guard: guard})
	}
	return out
}

// freeSlot returns the first /30 of pool that conflicts with none of claims.
func freeSlot(pool netip.Prefix, claims []claim) (netip.Prefix, bool) {
	var inPool []claim
	for _, c := range claims {
		if c.prefix.Overlaps(pool) {
			inPool = append(inPool, c)
		}
	}
	n := 1 << (30 - pool.Bits())
	a := pool.Masked().Addr()
next:
	for range n {
		slot := netip.PrefixFrom(a, 30)
		a = addN(a, 4)
		for _, c := range inPool {
			if c.conflicts(slot) {
				continue next
			}
		}
		return slot, true
	}
	return netip.Prefix{}, false
}

func addN(a netip.Addr, n uint32) netip.Addr {
	b := a.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += n
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}
}

// configureCellSide runs inside the cell's new namespace: it creates the veth pair with the host
// side in the host's namespace, and gives the cell side its address and default route. IPv6 is
// off in the namespace: the cell's link is IPv4 only.
func configureCellSide(c *Cell, host *os.File) error {
	for _, key := range []string{"net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"} {
		if err := writeSysctl(key, "1"); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink in the cell's namespace: %w", err)
	}
	defer h.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: c.CellIf}, PeerName: c.HostIf, PeerNamespace: netlink.NsFd(int(host.Fd()))}
	if err := h.LinkAdd(veth); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("creating the veth pair %s/%s: %w", c.HostIf, c.CellIf, ErrExists)
		}
		return fmt.Errorf("creating the veth pair %s/%s: %w", c.HostIf, c.CellIf, err)
	}
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("loopback in the cell's namespace: %w", err)
	}
	link, err := h.LinkByName(c.CellIf)
	if err != nil {
		return err
	}
	if err := h.AddrAdd(link, &netlink.Addr{IPNet: ipNet(c.CellAddr)}); err != nil {
		return fmt.Errorf("address %s on %s: %w", c.CellAddr, c.CellIf, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing %s up: %w", c.CellIf, err)
	}
	gw := c.HostAddr.Addr().AsSlice()
	if err := h.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw}); err != nil {
		return fmt.Errorf("default route via %s: %w", c.HostAddr.Addr(), err)
	}
	return nil
}

// configureHostSide sets up the host side of the pair: no IPv6, forwarding and strict
// reverse-path filtering on this interface only, the gateway address, up.
func configureHostSide(h hostHandle, c *Cell) error {
	link, err := h.LinkByName(c.HostIf)
	if err != nil {
		return fmt.Errorf("looking up %s: %w", c.HostIf, err)
	}
	sysctls := []struct{ key, value string }{
		{"net/ipv6/conf/" + c.HostIf + "/disable_ipv6", "1"},
		{"net/ipv4/conf/" + c.HostIf + "/rp_filter", "1"},
		{"net/ipv4/conf/" + c.HostIf + "/forwarding", "1"},
	}
	for _, s := range sysctls {
		if err := writeSysctl(s.key, s.value); err != nil && !(errors.Is(err, os.ErrNotExist) && strings.HasPrefix(s.key, "net/ipv6/")) {
			return err
		}
	}
	if err := h.AddrAdd(link, &netlink.Addr{IPNet: ipNet(c.HostAddr)}); err != nil {
		return fmt.Errorf("address %s on %s: %w", c.HostAddr, c.HostIf, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing %s up: %w", c.HostIf, err)
	}
	return nil
}

// deleteLink deletes the host side of a cell's veth pair, and with it the cell side.
func deleteLink(h hostHandle, name string) error {
	link, err := h.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err == nil {
		err = h.LinkDel(link)
	}
	if err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("deleting interface %s: %w", name, err)
	}
	return nil
}

// otherCells counts the host-side veths of cells other than the one whose veth is self.
func otherCells(h hostHandle, self string) (int, error) {
	var links []netlink.Link
	var err error
	for range dumpRetries {
		if links, err = h.LinkList(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return 0, fmt.Errorf("listing the host's interfaces: %w", err)
	}
	n := 0
	for _, l := range links {
		if name := l.Attrs().Name; strings.HasPrefix(name, IfPrefix) && name != self {
			n++
		}
	}
	return n, nil
}

// writeSysctl writes a sysctl of the calling thread's network namespace.
func writeSysctl(key, value string) error {
	path := filepath.Join("/proc/sys", key)
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", strings.ReplaceAll(key, "/", "."), value, err)
	}
	return nil
}

// ReadSysctl reads a sysctl of the caller's network namespace ("net/ipv4/conf/eth0/forwarding").
func ReadSysctl(key string) (string, error) {
	data, err := os.ReadFile(filepath.Join("/proc/sys", key))
	return strings.TrimSpace(string(data)), err
}
