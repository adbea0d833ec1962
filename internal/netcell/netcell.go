// Package netcell gives a cell a network of its own on the host and lets it reach exactly the
// destinations it declares, nothing else.
//
// Each cell gets a network namespace (NetnsDir/<name>, as ip-netns(8) names them), a veth pair
// whose cell side (eth0) is in that namespace and whose host side (cellos<9 hex>) is in the host's,
// and a /30 of an address pool: host side .1, cell side .2, a default route through the host side.
// The host forwards for the cell: forwarding is enabled on the host side of the pair only
// (net.ipv4.conf.<veth>.forwarding), never globally.
//
// Enforcement is on the host side of the pair, where the cell cannot reach: gVisor's netstack sends
// through a packet socket on eth0, so rules inside the cell's namespace would never see its
// traffic. One nftables table, inet cellos, is shared by every cell on the host (whatever process
// made it): its forward and input chains accept established and related traffic, then jump, by the
// incoming interface, through the verdict map @egress to the cell's own chain — a reject of the
// cell network, one accept rule per declared destination (ip daddr, tcp/udp dport, ct state new;
// the wider ones behind guards, see below), then a reject (icmpx admin-prohibited, so that a
// refused connect fails at once). Nothing may open a connection into a cell (forward and output
// chains reject new traffic towards cellos* interfaces), and traffic from a cellos* interface
// that has no chain is rejected too. Rules match on the interface, never on the source address:
// a cell that forges its source address is still judged by its own chain (and strict reverse-path
// filtering on its veth drops forged sources first).
//
// nftables is driven with the nft binary, one atomic batch (`nft -f -`) per setup and per teardown:
// the rules are written in nft's own language, exactly as `nft list ruleset` shows them, checked
// by nft's parser, and applied all or nothing. Links, addresses, routes and namespaces are made
// over netlink in process (github.com/vishvananda/netlink).
//
// No rule reaches the host itself, loopback, link-local (cloud metadata at 169.254.169.254) or
// the cell network through a wider range: such a rule is refused (RuleRefusal: at Setup, and by
// callers before they write anything), unless it names exactly one address as a /32; and each
// cell's chain refuses those destinations before its wider rules, whatever addresses the host
// gains later (nft's fib expression asks the host's own routing table at packet time).
//
// Every change to the host's network state happens under one host-wide lock (flock(2) on
// NetnsDir), so that concurrent cells of any number of processes never pick the same addresses
// and the shared table is removed only when the last cell is gone. The host's own addresses and
// routes are the registry of what is in use: a /30 that overlaps any address or route of the host
// (another cell's, another Backend's, the operator's) is skipped — but for a leak guard (an
// unreachable, blackhole or prohibit route of the main table) covering it, which the /30's own,
// more specific route overrides (see claims).
//
// A name is never trusted to stay inside NetnsDir: every function taking one refuses a name that
// is not plain (CheckName).
package netcell

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"
)

// Names shared by every cell on the host, whichever process made it.
const (
	Table    = "cellos"     // the nftables table: inet cellos
	IfPrefix = "cellos"     // host-side veth names: IfPrefix + 9 hex digits (15 bytes, the kernel's limit)
	CellIf   = "eth0"       // the cell side of the pair, inside its namespace
	NetnsDir = "/run/netns" // where named network namespaces live, as with ip-netns(8)
)

// ErrExists reports that a cell's namespace or veth already exists on the host: a leftover of an
// earlier cell with the same name.
var ErrExists = errors.New("exists")

// Rule is one allowed destination: IPv4 addresses, a port, a protocol.
type Rule struct {
	Prefix   netip.Prefix `json:"cidr"`
	Port     uint16       `json:"port"`
	Protocol string       `json:"protocol"` // "tcp" or "udp"
}

// Spec is what a cell's network is made from.
type Spec struct {
	// Name is unique on the host and at most 64 bytes of [A-Za-z0-9_.-]: the namespace's name;
	// the veth and the nftables chains are named after its digest.
	Name   string
	Pool   netip.Prefix // IPv4; the cell gets a /30 of it
	Uplink string       // masquerade through this interface; "" for none
	Rules  []Rule
}

// Cell is a cell's network as it was set up. Callers record it (the bundle's net.json) so that
// an operator, or a later process, can see what the cell had; Teardown needs only the name.
type Cell struct {
	Name     string       `json:"name"`
	Netns    string       `json:"netns"`         // the namespace's path, NetnsDir/<Name>
	HostIf   string       `json:"hostInterface"` // the host side of the veth pair
	CellIf   string       `json:"cellInterface"` // the cell side, in the namespace
	HostAddr netip.Prefix `json:"hostAddress"`   // on HostIf: the cell's gateway
	CellAddr netip.Prefix `json:"cellAddress"`   // on CellIf
	Pool     netip.Prefix `json:"pool"`
	Uplink   string       `json:"uplink,omitempty"`
	Rules    []Rule       `json:"rules"`
}

// RuleError is a rule that may not be set up (RuleRefusal); Index is its place in Spec.Rules.
type RuleError struct {
	Index  int
	Prefix netip.Prefix
	Reason string
}

func (e *RuleError) Error() string {
	return fmt.Sprintf("netcell: rule %d, %v: %s", e.Index, e.Prefix, e.Reason)
}

// CheckName checks a cell's name: 1 to 64 bytes of [A-Za-z0-9_.-], not starting with '.', so
// that NetnsDir/<name> is a file directly inside NetnsDir.
func CheckName(name string) error {
	if name == "" || len(name) > 64 || name[0] == '.' {
		return fmt.Errorf("netcell: bad name %q: 1 to 64 bytes, not starting with '.'", name)
	}
	for _, r := range []byte(name) {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.') {
			return fmt.Errorf("netcell: bad name %q: only letters, digits, '_', '-' and '.'", name)
		}
	}
	return nil
}

// NetnsPath is the path of the namespace of the cell called name.
func NetnsPath(name string) (string, error) {
	if err := CheckName(name); err != nil {
		return "", err
	}
	return filepath.Join(NetnsDir, name), nil
}

// HostIfName is the host-side veth of the cell called name.
func HostIfName(name string) string {
	sum := sha256.Sum256([]byte(name))
	return IfPrefix + hex.EncodeToString(sum[:5])[:9]
}

// natChain is the cell's chain in the postrouting (masquerade) path.
func natChain(hostIf string) string { return hostIf + "-nat" }

// lockTimeout bounds waiting for the host-wide lock; setups and teardowns hold it for tens of
// milliseconds.
const lockTimeout = 30 * time.Second

// Setup makes the cell's network: namespace, veth pair, addresses, route, sysctls and rules.
// record is called with the cell's description once its addresses are chosen and before anything
// is created on the host, so that a crash at any later point leaves a record to clean up after.
// On failure Setup removes what it made.
func Setup(ctx context.Context, spec Spec, record func(*Cell) error) (*Cell, error) {
	if err := spec.check(); err != nil {
		return nil, err
	}
	nft, err := NftPath()
	if err != nil {
		return nil, err
	}
	unlock, err := lockHost(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	c := &Cell{Name: spec.Name, Netns: filepath.Join(NetnsDir, spec.Name), HostIf: HostIfName(spec.Name), CellIf: CellIf,
		Pool: spec.Pool, Uplink: spec.Uplink, Rules: spec.Rules}
	if _, err := os.Lstat(c.Netns); err == nil {
		return nil, fmt.Errorf("network namespace %s: %w", c.Netns, ErrExists)
	}
	h, err := newHostHandle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	if found, err := linkExists(h, c.HostIf); err != nil {
		return nil, err
	} else if found {
		return nil, fmt.Errorf("interface %s: %w", c.HostIf, ErrExists)
	}
	hn, err := readHostNet(h)
	if err != nil {
		return nil, err
	}
	// The caller checked the rules against the host's addresses before writing anything; this
	// check, under the lock, also catches an address the host gained since.
	if err := checkRules(spec, hn.hostAddrs()); err != nil {
		return nil, err
	}
	slot, ok := freeSlot(spec.Pool, hn.claims())
	if !ok {
		return nil, fmt.Errorf("no free /30 left in the cell network %s (every one overlaps an address or route of the host)", spec.Pool)
	}
	c.HostAddr = netip.PrefixFrom(slot.Addr().Next(), 30)
	c.CellAddr = netip.PrefixFrom(slot.Addr().Next().Next(), 30)
	if err := record(c); err != nil {
		return nil, fmt.Errorf("recording the cell's network: %w", err)
	}
	if err := setupLocked(h, nft, c); err != nil {
		if cerr := teardownLocked(h, nft, c.Name); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleaning up: %w", cerr))
		}
		return nil, err
	}
	return c, nil
}

// setupLocked makes the links and the rules. The nft batch runs alongside the netlink work: the
// rules name the interface, they do not need it to exist, and no traffic flows before the cell
// starts.
func setupLocked(h hostHandle, nft string, c *Cell) error {
	rules := make(chan error, 1)
	go func() { rules <- runNft(nft, setupBatch(c)) }()
	err := ensureNetnsDir()
	if err == nil {
		err = createNetns(c.Netns, func(host *os.File) error { return configureCellSide(c, host) })
	}
	if err == nil {
		err = configureHostSide(h, c)
	}
	return errors.Join(err, <-rules)
}

// Teardown removes everything of the cell called name: its chains and map entries (the whole
// table when no other cell is left), its veth pair and its namespace. It is idempotent.
func Teardown(name string) error {
	if err := CheckName(name); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), lockTimeout)
	defer cancel()
	nft, err := NftPath()
	if err != nil {
		return err
	}
	unlock, err := lockHost(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	h, err := newHostHandle()
	if err != nil {
		return err
	}
	defer h.Close()
	return teardownLocked(h, nft, name)
}

func teardownLocked(h hostHandle, nft, name string) error {
	var errs []error
	hostIf := HostIfName(name)
	others, err := otherCells(h, hostIf)
	if err != nil {
		errs = append(errs, err)
	}
	if err != nil {
		others = 1 // unknown: keep the table, remove this cell's part of it
	}
	// The rules and the link go at the same time (deleting a veth pair waits for the kernel's
	// RCU grace period, ~20 ms). A teardown interrupted half-way is finished by the next one:
	// every step is found again by the cell's name.
	rules := make(chan error, 1)
	go func() { rules <- removeRules(nft, hostIf, others) }()
	if err := deleteLink(h, hostIf); err != nil {
		errs = append(errs, err)
	}
	if err := <-rules; err != nil {
		errs = append(errs, err)
	}
	if err := removeNetns(filepath.Join(NetnsDir, name)); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Exists reports whether the namespace of the cell called name is on the host: a cheap test (one
// stat) for callers that do not know whether a cell had a network. It is false for a name that
// is not plain (CheckName): nothing outside NetnsDir is looked at.
func Exists(name string) bool {
	path, err := NetnsPath(name)
	if err != nil {
		return false
	}
	_, err = os.Lstat(path)
	return err == nil
}

func (s Spec) check() error {
	if err := CheckName(s.Name); err != nil {
		return err
	}
	if err := CheckPool(s.Pool); err != nil {
		return err
	}
	if s.Uplink != "" {
		if err := CheckIfName(s.Uplink); err != nil {
			return err
		}
	}
	for _, r := range s.Rules {
		if !r.Prefix.IsValid() || !r.Prefix.Addr().Is4() || r.Prefix != r.Prefix.Masked() {
			return fmt.Errorf("netcell: rule %v: not an IPv4 network", r.Prefix)
		}
		if r.Port == 0 || (r.Protocol != "tcp" && r.Protocol != "udp") {
			return fmt.Errorf("netcell: rule %v %s/%d: bad port or protocol", r.Prefix, r.Protocol, r.Port)
		}
	}
	return checkRules(s, nil)
}

// checkRules refuses the rules that RuleRefusal refuses, against the host's addresses host.
func checkRules(s Spec, host []HostAddr) error {
	var errs []error
	for i, r := range s.Rules {
		if reason := RuleRefusal(r.Prefix, s.Pool, host); reason != "" {
			errs = append(errs, &RuleError{Index: i, Prefix: r.Prefix, Reason: reason})
		}
	}
	return errors.Join(errs...)
}

// CheckPool checks a cell network: an IPv4 network with room for at least one /30, and not wider
// than a /8.
func CheckPool(p netip.Prefix) error {
	switch {
	case !p.IsValid() || !p.Addr().Is4():
		return fmt.Errorf("%v is not an IPv4 network", p)
	case p != p.Masked():
		return fmt.Errorf("%v has host bits set; did you mean %v?", p, p.Masked())
	case p.Bits() > 30:
		return fmt.Errorf("%v is too small: each cell takes a /30", p)
	case p.Bits() < 8:
		return fmt.Errorf("%v is too wide: at most a /8", p)
	}
	return nil
}

// CheckIfName checks an interface name as the kernel and nft accept it.
func CheckIfName(name string) error {
	if name == "" || len(name) > 15 {
		return fmt.Errorf("%q is not an interface name (1 to 15 bytes)", name)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.') {
			return fmt.Errorf("%q is not an interface name: only letters, digits, '_', '-' and '.'", name)
		}
	}
	if name == "." || name == ".." {
		return fmt.Errorf("%q is not an interface name", name)
	}
	return nil
}
