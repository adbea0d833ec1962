package gvisor

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/shim"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	"go.uber.org/zap"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/netcell"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
)

// Egress: a cell with `network.egress` rules gets a network of its own — a network namespace, a
// veth pair to the host, a /30 of the cell network (WithCellNetwork) — and nftables rules on the
// host side of the pair that let it open connections to exactly the declared cidr:port/protocol
// destinations and nothing else; nothing can open a connection into it. The namespace is the
// OCI config's network namespace (its path), and runsc runs the cell with --network=sandbox:
// gVisor's own network stack (netstack) serves the cell, on the namespace's interface. See
// internal/netcell for the host side. Cells without egress rules are untouched by all of this:
// --network=none, no namespace, no rules, no extra work at Create or Destroy.

// DefaultCellNetwork is the pool the cells' point-to-point links are carved from when
// WithCellNetwork is not given: 10.77.0.0/16, 16384 cells. It is a private range (RFC 1918) that
// none of the usual defaults take — Docker (172.17–31.x, 192.168.x), Podman (10.88–89.x),
// Kubernetes (10.96.0.0/12 services, 10.244/16 flannel, 10.42–43/16 k3s), libvirt
// (192.168.122/24), cloud default VPCs (172.31/16, 10.0/16, GCP's 10.128/9) — and it stays out of
// 100.64.0.0/10, which Tailscale and carrier-grade NAT use. A /30 that overlaps any address or
// route of the host is skipped anyway (a leak guard such as `ip route add unreachable 10.0.0.0/8`
// excepted: the /30's own route overrides it), so a collision with a network the host knows costs
// nothing; choose another pool when cells must reach destinations inside 10.77/16.
const DefaultCellNetwork = "10.77.0.0/16"

// Runsc network modes of a cell with egress rules (CellNetwork.Mode).
const (
	NetworkSandbox = "sandbox" // gVisor's netstack in the cell's namespace (--network=sandbox)
	NetworkHost    = "host"    // the host kernel's stack in the cell's namespace (--network=host); see WithHostStackNetworking
)

type netOptions struct {
	pool      netip.Prefix
	uplink    string
	hostStack bool
}

// WithCellNetwork sets the IPv4 pool the cells' links are carved from, one /30 per cell (host
// side .1, cell side .2): default DefaultCellNetwork. Addresses the host already uses — another
// Backend's cells, the operator's networks — are skipped.
func WithCellNetwork(cidr string) Option {
	return func(o *options) error {
		p, err := netip.ParsePrefix(cidr)
		if err == nil {
			err = netcell.CheckPool(p)
		}
		if err != nil {
			return fmt.Errorf("WithCellNetwork: %w", err)
		}
		o.net.pool = p
		return nil
	}
}

// WithEgressUplink masquerades cells' allowed traffic leaving through the named interface (the
// host's address replaces the cell's), so that cells can reach destinations beyond the host.
// Unset, nothing is masqueraded. The host must forward replies arriving on the uplink:
// `sysctl net.ipv4.conf.<ifname>.forwarding=1` (the library never changes the uplink's or the
// global forwarding setting), and route the destinations through it (README, "Network").
func WithEgressUplink(ifname string) Option {
	return func(o *options) error {
		if err := netcell.CheckIfName(ifname); err != nil {
			return fmt.Errorf("WithEgressUplink: %w", err)
		}
		o.net.uplink = ifname
		return nil
	}
}

// WithHostStackNetworking, given true, lets cells with egress rules run with a runsc that cannot
// do sandbox networking on this host (Debian's 2022 runsc cannot here): runsc then runs the cell
// with --network=host inside the cell's own namespace. The same host-side rules apply, but the
// cell's socket calls are served by the host kernel's network stack instead of gVisor's, so a
// bug in the host kernel's networking is reachable from the cell: weaker isolation (README,
// "Network"). Without it, such cells are refused with ErrUnsupported. A runsc that can do
// sandbox networking always gets it, whatever this option says.
func WithHostStackNetworking(allow bool) Option {
	return func(o *options) error {
		o.net.hostStack = allow
		return nil
	}
}

// CellNetwork is the network of a cell with egress rules.
type CellNetwork struct {
	Mode          string       // NetworkSandbox or NetworkHost
	Namespace     string       // the network namespace's path, /run/netns/<name> (`ip netns exec <name>` enters it)
	HostInterface string       // the host side of the veth pair (its nft chain has the same name)
	CellInterface string       // the cell side, in the namespace
	HostAddress   netip.Prefix // the cell's gateway
	CellAddress   netip.Prefix
	Uplink        string // the masquerading interface, "" for none
}

// netRecord is bundle.Net.
type netRecord struct {
	Mode string `json:"mode"`
	netcell.Cell
}

// cellNet is a cell's network: planned at Create, set up, or adopted from its record.
type cellNet struct {
	mode string
	spec netcell.Spec  // the plan (Create)
	cell *netcell.Cell // what was set up or recorded; nil before
	name string        // the host-wide name of its namespace; the veth and chains derive from it
}

// nsPath is the network namespace path for config.json; "" for a cell without a network.
func (n *cellNet) nsPath() string {
	if n == nil {
		return ""
	}
	return netnsPath(n.name)
}

// netnsPath is the namespace path of a network name made by RunscID, which is always a plain
// name (netcell.CheckName).
func netnsPath(name string) string {
	path, err := netcell.NetnsPath(name)
	if err != nil {
		panic(fmt.Sprintf("gvisor: network name %q: %v", name, err))
	}
	return path
}

// netName is the host-wide name of a cell's network namespace; its veth and chains derive from
// it. It is computed from the bundle root and the cell's id, as at Create, and never read from
// the bundle: a record there is display data, not an instruction (readNetRecord).
func netName(c *cell) string { return RunscID(c.paths.root, c.id) }

// runscNetwork is the --network value; "" (none) for a cell without a network.
func (n *cellNet) runscNetwork() string {
	if n == nil {
		return ""
	}
	return n.mode
}

// egressNetNS is the network namespace path config.json names for a cell of the bundle root:
// "" for a cell without egress rules.
func egressNetNS(root string, s *cellos.CellSpec) string {
	if !hasEgress(s) {
		return ""
	}
	return netnsPath(RunscID(root, s.ID))
}

// hasEgress reports whether a document declares egress rules.
func hasEgress(s *cellos.CellSpec) bool { return s.Network != nil && len(s.Network.Egress) > 0 }

// egressSupported refuses rules this backend cannot enforce — cells' links are IPv4 only
// (ErrUnsupported) — and, as an *cellos.Error of kind ErrInvalidSpec, rules that would reach
// loopback or link-local (cloud metadata) through a wider range: what any host refuses, checked
// before anything else. planNetwork checks the rest against the host and the cell network.
func egressSupported(s *cellos.CellSpec) error {
	if !hasEgress(s) {
		return nil
	}
	for i, r := range s.Network.Egress {
		if p, err := netip.ParsePrefix(r.CIDR); err == nil && !p.Addr().Is4() {
			return cellos.FieldError{Field: egressField(i),
				Reason: fmt.Sprintf("%q: IPv6 egress is not supported: a cell's link is IPv4 only", r.CIDR)}
		}
	}
	if fe := refusedRules(s, netip.Prefix{}, nil); len(fe) > 0 {
		return &cellos.Error{Kind: cellos.ErrInvalidSpec, Err: fe}
	}
	return nil
}

func egressField(i int) string { return fmt.Sprintf("spec.network.egress[%d].cidr", i) }

// refusedRules lists the rules netcell.RuleRefusal refuses, against the cell network pool (an
// invalid one skips it) and the host's addresses (nil skips them).
func refusedRules(s *cellos.CellSpec, pool netip.Prefix, host []netcell.HostAddr) cellos.FieldErrors {
	var fe cellos.FieldErrors
	for i, r := range s.Network.Egress {
		p, err := netip.ParsePrefix(r.CIDR)
		if err != nil || !p.Addr().Is4() {
			continue // validated, and IPv6 refused, before
		}
		if reason := netcell.RuleRefusal(p, pool, host); reason != "" {
			fe = append(fe, cellos.FieldError{Field: egressField(i), Reason: fmt.Sprintf("%q %s", r.CIDR, reason)})
		}
	}
	return fe
}

// planNetwork decides how a cell with egress rules gets its network, before anything is written:
// nil for a cell without rules.
func (b *Backend) planNetwork(ctx context.Context, s *cellos.CellSpec, loc location) (*cellNet, error) {
	if !hasEgress(s) {
		return nil, nil
	}
	pool := b.opts.net.pool
	if !pool.IsValid() {
		pool = netip.MustParsePrefix(DefaultCellNetwork)
	}
	// Rules that would reach the host's own addresses or the cell network: refused before the
	// host is asked for anything else (netcell.Setup checks again, under its lock).
	host, err := netcell.HostAddrs()
	if err != nil {
		return nil, cellos.NewError("create", s.ID, cellos.ErrHost, err)
	}
	if fe := refusedRules(s, pool, host); len(fe) > 0 {
		return nil, cellos.NewError("create", s.ID, cellos.ErrInvalidSpec, fe)
	}
	mode, err := b.egressMode(ctx, s.ID, loc)
	if err != nil {
		return nil, err
	}
	name := RunscID(loc.root, s.ID)
	spec := netcell.Spec{Name: name, Pool: pool, Uplink: b.opts.net.uplink}
	for _, r := range s.Network.Egress {
		p, _ := netip.ParsePrefix(r.CIDR) // validated
		spec.Rules = append(spec.Rules, netcell.Rule{Prefix: p, Port: uint16(r.Port), Protocol: r.Protocol})
	}
	return &cellNet{mode: mode, spec: spec, name: name}, nil
}

// EgressMode reports how cells with egress rules would run if created now, with the runsc
// Create would use: NetworkSandbox, or NetworkHost (a runsc without sandbox networking and
// WithHostStackNetworking(true)). A runsc without sandbox networking is an error wrapping
// ErrUnsupported otherwise; a host that cannot give cells a network (not root, no nft, a missing
// uplink) one wrapping ErrHost. The first call per runsc binary probes it (see below).
func (b *Backend) EgressMode(ctx context.Context) (string, error) {
	const op = "egress-mode"
	loc := b.locate()
	if loc.runscErr != nil {
		return "", cellos.NewError(op, "", cellos.ErrHost, loc.runscErr)
	}
	info, err := b.runtime(ctx, loc.runsc.Path, op, "")
	if err != nil {
		return "", err
	}
	loc.runsc.Platform = b.platformFlag(info)
	loc.runsc.NoOverlay2 = !info.Features.Overlay2
	mode, err := b.egressMode(ctx, "", loc)
	return mode, relabel(err, op)
}

// egressMode checks what the host must give a cell with egress rules, and chooses the runsc
// network mode. What the host lacks is ErrHost; a runsc that cannot do sandbox networking is
// ErrUnsupported unless WithHostStackNetworking allows the host stack.
func (b *Backend) egressMode(ctx context.Context, cellID string, loc location) (string, error) {
	const op = "create"
	hostErr := func(format string, args ...any) error {
		return cellos.NewError(op, cellID, cellos.ErrHost, cellos.FieldError{Field: "spec.network.egress", Reason: fmt.Sprintf(format, args...)})
	}
	if !b.root {
		return "", hostErr("egress rules need root: the library makes a network namespace, a veth pair and nftables rules for the cell")
	}
	if _, err := netcell.NftPath(); err != nil {
		return "", hostErr("%v", err)
	}
	if up := b.opts.net.uplink; up != "" {
		if _, err := os.Stat(filepath.Join("/sys/class/net", up)); err != nil {
			return "", hostErr("the egress uplink %q (WithEgressUplink) is not an interface of this host", up)
		}
		if v, err := netcell.ReadSysctl("net/ipv4/conf/" + up + "/forwarding"); err == nil && v == "0" {
			b.log.Warn("the egress uplink does not forward: replies to cells will not come back through it; set net.ipv4.conf.<uplink>.forwarding=1",
				zap.String("cell", cellID), zap.String("uplink", up))
		}
	}
	sandbox, reason, err := b.sandboxNetworking(ctx, cellID, loc)
	if err != nil {
		return "", err
	}
	if sandbox {
		return NetworkSandbox, nil
	}
	if !b.opts.net.hostStack {
		return "", cellos.NewError(op, cellID, cellos.ErrUnsupported, cellos.FieldError{Field: "spec.network.egress",
			Reason: fmt.Sprintf("runsc %s cannot run cells with sandbox networking on this host (%s); WithHostStackNetworking(true) allows the weaker host-stack mode", loc.runsc.Path, reason)})
	}
	return NetworkHost, nil
}

// setupNetwork makes the cell's network (Create, after the bundle is written): the record first,
// then the namespace, the veth pair and the rules.
func (b *Backend) setupNetwork(ctx context.Context, c *cell) error {
	n := c.net
	start := time.Now()
	nc, err := netcell.Setup(ctx, n.spec, func(nc *netcell.Cell) error {
		return bundle.WriteRecord(c.dir, bundle.Net, netRecord{Mode: n.mode, Cell: *nc})
	})
	if err != nil {
		kind := cellos.ErrHost
		var re *netcell.RuleError
		switch {
		case errors.Is(err, netcell.ErrExists):
			kind = cellos.ErrAlreadyExists
			err = fmt.Errorf("%w; Destroy or Recover removes it", err)
		case errors.As(err, &re): // the host gained an address since planNetwork
			return cellos.NewError("create", c.id, cellos.ErrInvalidSpec, cellos.FieldError{Field: egressField(re.Index),
				Reason: fmt.Sprintf("%q %s", re.Prefix, re.Reason)})
		}
		return cellos.NewError("create", c.id, kind, fmt.Errorf("cell network: %w", err))
	}
	n.cell = nc
	applied := true
	c.handle.NftRulesApplied = &applied
	b.log.Info("cell network up", zap.String("cell", c.id), zap.String("mode", n.mode),
		zap.String("netns", nc.Netns), zap.String("veth", nc.HostIf), zap.String("cellInterface", nc.CellIf),
		zap.Stringer("hostAddress", nc.HostAddr), zap.Stringer("cellAddress", nc.CellAddr),
		zap.String("uplink", nc.Uplink), zap.Int("rules", len(nc.Rules)), zap.Duration("took", time.Since(start)))
	return nil
}

// releaseNetwork removes the cell's network, if it has one: its rules, its veth pair and its
// namespace, all named after netName. A tracked cell without one costs nothing; for an untracked
// cell the bundle's record tells, else the namespace's presence on the host (one stat).
func (b *Backend) releaseNetwork(c *cell, bundleIsDir bool) error {
	name := netName(c)
	switch {
	case c.net != nil:
	case c.created:
		return nil
	case bundleIsDir && b.readNetRecord(c, name) != nil:
	case !netcell.Exists(name):
		return nil
	}
	start := time.Now()
	if err := netcell.Teardown(name); err != nil {
		return fmt.Errorf("cell network %s: %w", name, err)
	}
	b.log.Info("cell network removed", zap.String("cell", c.id), zap.String("netns", netnsPath(name)),
		zap.String("veth", netcell.HostIfName(name)), zap.Duration("took", time.Since(start)))
	return nil
}

// adoptNetwork restores an adopted cell's network from its record (Recover, Attach). Without a
// record it can show, a namespace of the cell's name on the host is still the cell's, for Destroy
// to remove.
func (b *Backend) adoptNetwork(c *cell) {
	name := netName(c)
	if rec := b.readNetRecord(c, name); rec != nil {
		cp := rec.Cell
		c.net = &cellNet{mode: rec.Mode, cell: &cp, name: name}
		applied := true
		c.handle.NftRulesApplied = &applied
	} else if netcell.Exists(name) {
		c.net = &cellNet{name: name}
	}
}

// readNetRecord reads the bundle's net.json for what it shows (mode, addresses, rules, uplink):
// nil when there is none, and when it does not describe the network called name — then it is
// refused, with a warning. Its paths and interface names are replaced by those name derives.
func (b *Backend) readNetRecord(c *cell, name string) *netRecord {
	if c.dir == nil {
		return nil
	}
	path := filepath.Join(c.dir.Path(), bundle.Net)
	var rec netRecord
	if err := bundle.ReadRecord(c.dir, bundle.Net, &rec); err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			b.log.Warn("ignoring the bundle's network record: unreadable", zap.String("cell", c.id), zap.String("file", path), zap.Error(err))
		}
		return nil
	}
	switch {
	case rec.Name != name:
		b.log.Warn("refusing the bundle's network record: it names another network than the cell's; the cell's own is used",
			zap.String("cell", c.id), zap.String("file", path), zap.String("recorded", rec.Name), zap.String("expected", name))
		return nil
	case rec.Mode != NetworkSandbox && rec.Mode != NetworkHost:
		b.log.Warn("refusing the bundle's network record: unknown mode", zap.String("cell", c.id), zap.String("file", path),
			zap.String("mode", rec.Mode))
		return nil
	}
	rec.Netns, rec.HostIf, rec.CellIf = netnsPath(name), netcell.HostIfName(name), netcell.CellIf
	return &rec
}

// NetworkOf describes the network of a cell this Backend tracks: nil for a cell without egress
// rules, ErrNotTracked for an unknown id or one still being created.
func (b *Backend) NetworkOf(cellID string) (*CellNetwork, error) {
	const op = "network"
	if err := cellos.CheckID(op, cellID); err != nil {
		return nil, err
	}
	c := b.cells.get(cellID)
	if c != nil {
		select {
		case <-c.ready:
		default:
			c = nil
		}
	}
	if c == nil || !c.created {
		return nil, cellos.Errorf(op, cellID, cellos.ErrNotTracked, "no such cell in this backend")
	}
	if c.net == nil || c.net.cell == nil {
		return nil, nil
	}
	nc := c.net.cell
	return &CellNetwork{Mode: c.net.mode, Namespace: nc.Netns, HostInterface: nc.HostIf, CellInterface: nc.CellIf,
		HostAddress: nc.HostAddr, CellAddress: nc.CellAddr, Uplink: nc.Uplink}, nil
}

// Whether a runsc binary can run cells with sandbox networking is not in its flags or version:
// Debian's 2022 runsc has --network=sandbox but refuses it on current kernels ("cannot run with
// network enabled in root network namespace": it takes any namespace with
// /proc/sys/net/core/rmem_default for the host's, and recent kernels, this VM's 6.x among them,
// have that file in every namespace; current runsc checks dev_weight instead). So the library tries: once per binary (cached like the runsc probe), before the
// first cell with egress rules, it runs /bin/true with --network=sandbox in an empty namespace of
// its own, and — only if that fails — with --network=none, to tell a runsc that cannot do
// sandbox networking from one that cannot run cells at all.

// netProbe is the result of that trial.
type netProbe struct {
	sandbox bool
	reason  string // why not, in runsc's words
	took    time.Duration
}

// netProbeTimeout bounds the trial; like the runsc probe it runs detached from the caller's ctx.
const netProbeTimeout = 60 * time.Second

// sandboxNetworking reports whether the runsc of loc can run cells with --network=sandbox.
func (b *Backend) sandboxNetworking(ctx context.Context, cellID string, loc location) (bool, string, error) {
	key, err := runsc.KeyOf(loc.runsc.Path)
	if err != nil {
		return false, "", cellos.NewError("create", cellID, cellos.ErrHost, err)
	}
	r, host := *loc.runsc, b.host
	res, first, err := b.netProbes.Do(ctx, key, netProbeTimeout, func(ctx context.Context) (netProbe, error) {
		return probeSandboxNetworking(ctx, r, host)
	})
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("probing runsc's networking: %w", err)
		}
		return false, "", cellos.NewError("create", cellID, cellos.ErrHost, err)
	}
	if first {
		b.log.Info("runsc network probe", zap.String("runsc", loc.runsc.Path), zap.Bool("sandboxNetworking", res.sandbox),
			zap.String("reason", res.reason), zap.Duration("took", res.took))
	}
	return res.sandbox, res.reason, nil
}

// probeSandboxNetworking runs the trial in a temporary directory of its own (bundle, state root,
// namespace), which it removes.
func probeSandboxNetworking(ctx context.Context, r runsc.Runsc, host []HostEntry) (netProbe, error) {
	start := time.Now()
	dir, err := os.MkdirTemp("", "cellos-netprobe-")
	if err != nil {
		return netProbe{}, err
	}
	defer os.RemoveAll(dir)
	ns := filepath.Join(dir, "netns")
	if err := netcell.CreateNetns(ns); err != nil {
		return netProbe{}, fmt.Errorf("probing runsc's networking: %w", err)
	}
	defer netcell.RemoveNetns(ns)
	ok, msg, err := trialRun(ctx, r, host, dir, ns, NetworkSandbox)
	if err != nil || ok {
		return netProbe{sandbox: ok, took: time.Since(start)}, err
	}
	okNone, msgNone, err := trialRun(ctx, r, host, dir, ns, "none")
	if err != nil {
		return netProbe{}, err
	}
	if !okNone {
		return netProbe{}, fmt.Errorf("runsc %s cannot run a trivial cell: %s", r.Path, msgNone)
	}
	return netProbe{reason: msg, took: time.Since(start)}, nil
}

// trialRun runs /bin/true under runsc with the given --network, in the namespace ns, and reports
// whether it exited 0 and, if not, runsc's message.
func trialRun(ctx context.Context, r runsc.Runsc, host []HostEntry, dir, ns, network string) (bool, string, error) {
	var rnd [12]byte
	_, _ = rand.Read(rnd[:])
	id := runsc.IDPrefix + "netprobe-" + hex.EncodeToString(rnd[:])
	top, err := owned.Ensure(dir, 0o700)
	if err != nil {
		return false, "", err
	}
	defer top.Close()
	bdir, err := top.Mkdir("bundle-"+network, 0o700)
	if err != nil {
		return false, "", err
	}
	defer bdir.Close()
	bpath := bdir.Path()
	rootfs, err := bdir.Mkdir(bundle.Rootfs, 0o755)
	if err != nil {
		return false, "", err
	}
	defer rootfs.Close()
	doc := &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
		Spec: cellos.CellSpec{ID: "netprobe", Run: cellos.RunSpec{Argv: []string{"/bin/true"}}}}
	if err := bundle.WriteRootfs(rootfs, &doc.Spec, host); err != nil {
		return false, "", err
	}
	data, err := MarshalSpec(BuildSpec(doc, SpecInputs{HostSystem: host, NetNSPath: ns}))
	if err == nil {
		err = bdir.WriteFile(bundle.Config, data, 0o644)
	}
	if err != nil {
		return false, "", err
	}
	r.Root = filepath.Join(dir, "state-"+network)
	if err := os.MkdirAll(r.Root, 0o700); err != nil {
		return false, "", err
	}
	flags := runsc.CellFlags{Log: filepath.Join(dir, "runsc-"+network+".log"), IgnoreCgroups: true, Overlay: "none", Network: network}
	if r.NoOverlay2 {
		flags.Overlay = ""
	}
	cmd := r.Command(ctx, r.RunArgs(flags, bpath, id)...)
	cmd.Dir = bpath
	var out runsc.BoundedBuffer
	out.Max = 64 << 10
	cmd.Stdout, cmd.Stderr = &out, &out
	runErr := r.Run(cmd)
	// Whatever happened, leave nothing of the trial container.
	if len(r.StateFiles(id)) > 0 {
		dctx, cancel := context.WithTimeout(context.Background(), runscTimeout)
		_ = r.Delete(dctx, id)
		cancel()
		r.RemoveStaleLocks(id)
	}
	_ = r.ReleaseSharedState()
	if ctx.Err() != nil {
		return false, "", fmt.Errorf("probing runsc's networking: %w", ctx.Err())
	}
	if runErr == nil {
		return true, "", nil
	}
	var ee *exec.ExitError
	if !errors.As(runErr, &ee) {
		return false, "", fmt.Errorf("running runsc %s: %w", r.Path, runErr)
	}
	msg := shim.RunscFailure(top, "runsc-"+network+".log")
	if msg == "" {
		msg = strings.TrimSpace(out.String())
	}
	return false, runsc.Clip(msg, 500), nil
}
