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

// usedPrefixes lists the IPv4 networks the host uses: every address (as its network and as
// itself) and every route but default ones, in every routing table.
func usedPrefixes(h hostHandle) ([]netip.Prefix, error) {
	var addrs []netlink.Addr
	var routes []netlink.Route
	var err error
	for range dumpRetries {
		if addrs, err = h.AddrList(nil, netlink.FAMILY_V4); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("listing the host's addresses: %w", err)
	}
	for range dumpRetries {
		routes, err = h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("listing the host's routes: %w", err)
	}
	var used []netip.Prefix
	add := func(n *net.IPNet) {
		if n == nil {
			return
		}
		ip, ok := netip.AddrFromSlice(n.IP.To4())
		ones, bits := n.Mask.Size()
		if !ok || bits != 32 {
			return
		}
		used = append(used, netip.PrefixFrom(ip, 32), netip.PrefixFrom(ip, ones).Masked())
	}
	for _, a := range addrs {
		add(a.IPNet)
	}
	for _, r := range routes {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones == 0 {
				continue // a default route covers everything and says nothing about use
			}
		}
		add(r.Dst)
	}
	return used, nil
}

// freeSlot returns the first /30 of pool that overlaps none of used.
func freeSlot(pool netip.Prefix, used []netip.Prefix) (netip.Prefix, bool) {
	var inPool []netip.Prefix
	for _, u := range used {
		if u.Overlaps(pool) {
			inPool = append(inPool, u)
		}
	}
	n := 1 << (30 - pool.Bits())
	a := pool.Masked().Addr()
next:
	for range n {
		slot := netip.PrefixFrom(a, 30)
		a = addN(a, 4)
		for _, u := range inPool {
			if u.Overlaps(slot) {
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
