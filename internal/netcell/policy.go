package netcell

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// What a rule may not reach through a wider range. A rule whose prefix overlaps one of these is
// refused unless it names exactly one address, as a /32: the operator meant that address. The
// cells' chains enforce the same at packet time (setupBatch), for addresses the host gains after
// a cell was set up too.
//
//   - loopback, 127.0.0.0/8: the host's own services (a host with route_localnet=1 accepts it
//     from any interface);
//   - link-local, 169.254.0.0/16: where clouds serve instance metadata and credentials
//     (169.254.169.254), and the host's link-local neighbours;
//   - every address of the host itself: of any interface, and every range a local route of any
//     table gives it (HostAddrs);
//   - the cell network: other cells, and the host through their gateways. No rule reaches it,
//     not even a /32: every cell's chain refuses it first.
var guarded = []struct {
	prefix  netip.Prefix
	what    string
	example string // the /32 a refusal suggests
}{
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local: clouds serve instance metadata and credentials there", "169.254.169.254/32"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback: the host's own services", "127.0.0.1/32"},
}

// guardedSet is guarded in nft's syntax, in the order `nft list` shows it.
func guardedSet() string {
	ps := make([]netip.Prefix, len(guarded))
	for i, g := range guarded {
		ps[i] = g.prefix
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	parts := make([]string, len(ps))
	for i, p := range ps {
		parts[i] = p.String()
	}
	return "{ " + strings.Join(parts, ", ") + " }"
}

// HostAddr is an IPv4 address of the host, or a range of addresses a local route gives it.
type HostAddr struct {
	Prefix netip.Prefix // a /32 of an interface, or a local route's range
	Where  string       // "eth0", or "a local route of table 100"
}

func (a HostAddr) String() string {
	if a.Prefix.IsSingleIP() {
		return fmt.Sprintf("%s (%s)", a.Prefix.Addr(), a.Where)
	}
	return fmt.Sprintf("%s (%s)", a.Prefix, a.Where)
}

// HostAddrs lists the host's own IPv4 addresses: every address of every interface, and the range
// of every local route (`ip route add local 10.5.0.0/24 dev lo`, in any table) but a default one
// (TPROXY's `local default` of a table only marked packets use).
func HostAddrs() ([]HostAddr, error) {
	h, err := newHostHandle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	n, err := readHostNet(h)
	if err != nil {
		return nil, err
	}
	return n.hostAddrs(), nil
}

func (n hostNet) hostAddrs() []HostAddr {
	var out []HostAddr
	seen := map[netip.Prefix]bool{}
	for _, a := range n.addrs {
		p := netip.PrefixFrom(a.prefix.Addr(), 32)
		if !seen[p] {
			seen[p] = true
			out = append(out, HostAddr{Prefix: p, Where: a.label})
		}
	}
	for _, r := range n.routes {
		if r.typ == unix.RTN_LOCAL && r.dst.Bits() > 0 && !seen[r.dst] {
			seen[r.dst] = true
			out = append(out, HostAddr{Prefix: r.dst, Where: fmt.Sprintf("a local route of table %d", r.table)})
		}
	}
	return out
}

// RuleRefusal says why a rule for the IPv4 prefix p may not be set up — it would reach loopback,
// link-local, an address of the host (of host; nil skips this part) or the cell network pool (an
// invalid pool skips it) — and how to allow what the operator means. It is "" for a rule that
// may be.
func RuleRefusal(p, pool netip.Prefix, host []HostAddr) string {
	inPool := pool.IsValid() && p.Overlaps(pool)
	poolText := fmt.Sprintf("the cell network %s (other cells, and this host through their gateways)", pool)
	if inPool && p.Bits() >= pool.Bits() {
		return fmt.Sprintf("is inside %s, which no rule can open: choose another destination, or another cell network", poolText)
	}
	if p.IsSingleIP() {
		return "" // one address, named exactly
	}
	var hits []string
	example := ""
	for _, g := range guarded {
		if g.prefix.Overlaps(p) {
			hits = append(hits, fmt.Sprintf("%s (%s)", g.prefix, g.what))
			if example == "" {
				example = g.example
			}
		}
	}
	var own []string
	for _, a := range host {
		if !a.Prefix.Overlaps(p) || isGuarded(a.Prefix) {
			continue
		}
		own = append(own, a.String())
		if example == "" {
			example = netip.PrefixFrom(a.Prefix.Addr(), 32).String()
		}
	}
	if len(own) > 0 {
		const shown = 3
		text := "this host's own address"
		if len(own) > 1 {
			text += "es"
		}
		text += " " + strings.Join(own[:min(len(own), shown)], ", ")
		if len(own) > shown {
			text += fmt.Sprintf(" and %d more", len(own)-shown)
		}
		hits = append(hits, text)
	}
	if inPool {
		hits = append(hits, poolText)
	}
	if len(hits) == 0 {
		return ""
	}
	reason := "would reach " + joinAnd(hits)
	if example == "" { // the pool only
		return reason + ", which no rule can open: narrow the cidr, or choose another cell network"
	}
	reason += fmt.Sprintf(": a rule reaches an address of the host, loopback or link-local only by naming that one address as a /32 (e.g. %q)", example)
	if inPool {
		reason += "; no rule reaches the cell network"
	}
	return reason + "; otherwise narrow the cidr to the destinations the cell needs"
}

func isGuarded(p netip.Prefix) bool {
	for _, g := range guarded {
		if g.prefix.Overlaps(p) {
			return true
		}
	}
	return false
}

func joinAnd(parts []string) string {
	if len(parts) <= 1 {
		return strings.Join(parts, "")
	}
	return strings.Join(parts[:len(parts)-1], ", ") + " and " + parts[len(parts)-1]
}
