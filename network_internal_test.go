package gvisor

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/netcell"
)

func egressTestDoc(t testing.TB, rules string) *cellos.ExecutionCellDocument {
	return parseSpec(t, `{"id": "egress", "run": {"argv": ["/bin/true"]}, "network": {"egress": `+rules+`}}`)
}

// A cell with egress rules joins its namespace by path; the config stays valid and is written
// exactly as encoding/json writes it.
func TestSpecNetworkNamespacePath(t *testing.T) {
	doc := egressTestDoc(t, `[{"cidr": "198.51.100.0/24", "port": 443, "protocol": "tcp"}]`)
	path := egressNetNS("/var/lib/cellos", &doc.Spec)
	assert.Equal(t, "/run/netns/"+RunscID("/var/lib/cellos", "egress"), path)
	data, err := MarshalSpec(BuildSpec(doc, SpecInputs{HostSystem: goldenHost(), NetNSPath: path}))
	require.NoError(t, err)
	want, err := MarshalSpec(BuildSpec(doc, SpecInputs{HostSystem: goldenHost(), NetNSPath: path}))
	require.NoError(t, err)
	assert.Equal(t, string(want), string(data))
	require.NoError(t, validateConfig(configSchema(t), data))
	spec := decodeSpec(t, data)
	assert.Contains(t, spec.Linux.Namespaces, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: path})

	// Without rules: a new, empty namespace, as before.
	plain := parseSpec(t, `{"id": "plain", "run": {"argv": ["/bin/true"]}, "network": {"egress": []}}`)
	assert.Empty(t, egressNetNS("/var/lib/cellos", &plain.Spec))
	spec = decodeSpec(t, mustMarshal(t, BuildSpec(plain, SpecInputs{HostSystem: goldenHost()})))
	assert.Contains(t, spec.Linux.Namespaces, specs.LinuxNamespace{Type: specs.NetworkNamespace})
}

func mustMarshal(t testing.TB, s *specs.Spec) []byte {
	data, err := MarshalSpec(s)
	require.NoError(t, err)
	return data
}

func TestNetworkFlag(t *testing.T) {
	r := &runsc.Runsc{Root: "/state"}
	for network, want := range map[string]string{"": "--network=none", NetworkSandbox: "--network=sandbox", NetworkHost: "--network=host"} {
		args := r.RunArgs(runsc.CellFlags{Log: "/b/runsc.log", IgnoreCgroups: true, Overlay: "none", Network: network}, "/b", "cellos-x")
		assert.Equal(t, strings.Fields("--root /state --log /b/runsc.log --log-format=json "+want+" --ignore-cgroups --overlay2=none run --bundle /b cellos-x"), args)
	}
	// shim.json of a cell without egress rules is what it was.
	data, err := json.Marshal(runsc.CellFlags{Log: "/b/runsc.log"})
	require.NoError(t, err)
	assert.NotContains(t, string(data), "Network")
	var nw *cellNet
	assert.Empty(t, nw.runscNetwork())
	assert.Empty(t, nw.nsPath())
}

func TestEgressRefusals(t *testing.T) {
	err := egressSupported(&egressTestDoc(t, `[{"cidr": "10.0.0.0/8", "port": 1, "protocol": "udp"}, {"cidr": "2001:db8::/32", "port": 443, "protocol": "tcp"}]`).Spec)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "spec.network.egress[1].cidr")
	assert.NotErrorIs(t, err, cellos.ErrInvalidSpec, "IPv6 is unsupported (launch makes it ErrUnsupported)")

	// Loopback and link-local through a wider range: refused on any host, as an invalid spec;
	// one address named exactly is meant.
	require.NoError(t, egressSupported(&egressTestDoc(t, `[{"cidr": "169.254.169.254/32", "port": 80, "protocol": "tcp"}, {"cidr": "127.0.0.1/32", "port": 80, "protocol": "tcp"}]`).Spec))
	err = egressSupported(&egressTestDoc(t, `[{"cidr": "203.0.113.0/24", "port": 443, "protocol": "tcp"}, {"cidr": "0.0.0.0/0", "port": 80, "protocol": "tcp"}, {"cidr": "127.0.0.0/16", "port": 80, "protocol": "tcp"}]`).Spec)
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
	assert.Equal(t, []string{"spec.network.egress[1].cidr", "spec.network.egress[2].cidr"}, cellos.Fields(err))
	assert.Contains(t, err.Error(), `spec.network.egress[1].cidr: "0.0.0.0/0" would reach 169.254.0.0/16 (link-local: clouds serve instance metadata and credentials there) and 127.0.0.0/8 (loopback: the host's own services): `+
		`a rule reaches an address of the host, loopback or link-local only by naming that one address as a /32 (e.g. "169.254.169.254/32")`)
	// launch labels it with the operation and the cell.
	err = cellos.NewError("create", "egress", cellos.ErrUnsupported, err)
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
	require.NotErrorIs(t, err, cellos.ErrUnsupported)
	assert.True(t, strings.HasPrefix(err.Error(), `create cell "egress": invalid cell spec: spec.network.egress[1].cidr: "0.0.0.0/0" would reach`), err.Error())

	// Not root: the host cannot (ErrHost), before anything is probed or written.
	b, err := New()
	require.NoError(t, err)
	b.root = false
	doc := egressTestDoc(t, `[{"cidr": "203.0.113.0/24", "port": 443, "protocol": "tcp"}]`)
	_, err = b.planNetwork(context.Background(), &doc.Spec, b.locate())
	require.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "need root")
	// No rules: nothing to plan, nothing done.
	plain := parseSpec(t, `{"id": "plain", "run": {"argv": ["/bin/true"]}}`)
	n, err := b.planNetwork(context.Background(), &plain.Spec, b.locate())
	require.NoError(t, err)
	assert.Nil(t, n)

	// The cell network, and the host's own addresses: refused before anything else is asked of
	// the host (here, before root is).
	doc = egressTestDoc(t, `[{"cidr": "10.0.0.0/8", "port": 443, "protocol": "tcp"}]`)
	_, err = b.planNetwork(context.Background(), &doc.Spec, b.locate())
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
	assert.Equal(t, []string{"spec.network.egress[0].cidr"}, cellos.Fields(err))
	assert.Contains(t, err.Error(), `create cell "egress": invalid cell spec: spec.network.egress[0].cidr: "10.0.0.0/8" would reach the cell network 10.77.0.0/16`)
	host, err := netcell.HostAddrs()
	require.NoError(t, err)
	for _, a := range host {
		if a.Prefix.Addr().IsLoopback() || !a.Prefix.IsSingleIP() {
			continue
		}
		wide := netip.PrefixFrom(a.Prefix.Addr(), 16).Masked()
		doc = egressTestDoc(t, `[{"cidr": "`+wide.String()+`", "port": 443, "protocol": "tcp"}]`)
		_, err = b.planNetwork(context.Background(), &doc.Spec, b.locate())
		require.ErrorIs(t, err, cellos.ErrInvalidSpec, wide)
		assert.Contains(t, err.Error(), a.String(), "names the host's address")
		assert.Contains(t, err.Error(), `"`+a.Prefix.String()+`"`, "says how to allow it")
		doc = egressTestDoc(t, `[{"cidr": "`+a.Prefix.String()+`", "port": 443, "protocol": "tcp"}]`)
		_, err = b.planNetwork(context.Background(), &doc.Spec, b.locate())
		require.ErrorIs(t, err, cellos.ErrHost, "%v named exactly: allowed, and then root is needed", a)
		break
	}
}

// A bundle's net.json is display data. The names of the namespace, the veth and the chains are
// the cell's own (netName); a record that names another network is refused with a warning.
func TestNetRecordNeverInstructs(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	b, err := New(WithBundleRoot(t.TempDir()), WithLogger(zap.New(core)))
	require.NoError(t, err)
	loc := b.locate()
	c := b.newCell("rec", loc)
	c.dir = ownedDir(t, c.paths.bundle)
	name := RunscID(loc.root, "rec")
	assert.Equal(t, name, netName(c))
	write := func(rec any) string {
		data, err := json.Marshal(rec)
		require.NoError(t, err)
		path := filepath.Join(c.paths.bundle, bundle.Net)
		require.NoError(t, os.WriteFile(path, data, 0o644))
		return path
	}

	// A record of the cell's own network: shown, with the names its name derives.
	write(map[string]any{"mode": NetworkSandbox, "name": name, "netns": "/elsewhere", "hostInterface": "eth0", "cellInterface": "x",
		"hostAddress": "10.77.0.1/30", "cellAddress": "10.77.0.2/30", "rules": []map[string]any{{"cidr": "203.0.113.0/24", "port": 443, "protocol": "tcp"}}})
	b.adoptNetwork(c)
	require.NotNil(t, c.net)
	assert.Equal(t, name, c.net.name)
	assert.Equal(t, "/run/netns/"+name, c.net.cell.Netns)
	assert.Equal(t, netcell.HostIfName(name), c.net.cell.HostIf)
	assert.Equal(t, netcell.CellIf, c.net.cell.CellIf)
	assert.Equal(t, "10.77.0.2/30", c.net.cell.CellAddr.String())
	assert.Len(t, c.net.cell.Rules, 1)
	assert.Empty(t, logs.TakeAll())

	for _, forged := range []string{"../../tmp/x", "cellos-0123456789abcdef01234567", "", "/etc"} {
		path := write(map[string]any{"mode": NetworkSandbox, "name": forged})
		c := b.newCell("rec", loc)
		c.dir = ownedDir(t, c.paths.bundle)
		b.adoptNetwork(c)
		assert.Nil(t, c.net, "%q", forged)
		assert.Nil(t, c.handle.NftRulesApplied)
		require.NoError(t, b.releaseNetwork(c, true), "%q: untracked, nothing of its own on the host", forged)
		logged := logs.TakeAll()
		require.Len(t, logged, 2, "%q: adopt and release each refuse it, and nothing else: %v", forged, logged)
		for _, w := range logged {
			assert.Equal(t, zap.WarnLevel, w.Level)
			assert.Contains(t, w.Message, "refusing the bundle's network record")
			assert.Equal(t, map[string]any{"cell": "rec", "file": path, "recorded": forged, "expected": name}, w.ContextMap())
		}
	}
	write(map[string]any{"mode": "bridge", "name": name})
	b.adoptNetwork(c)
	assert.NotEmpty(t, logs.FilterMessageSnippet("unknown mode").TakeAll())
}
func TestNetworkOptions(t *testing.T) {
	b, err := New(WithCellNetwork("100.96.0.0/20"), WithEgressUplink("eth0"), WithHostStackNetworking(true))
	require.NoError(t, err)
	assert.Equal(t, "100.96.0.0/20", b.opts.net.pool.String())
	assert.Equal(t, "eth0", b.opts.net.uplink)
	assert.True(t, b.opts.net.hostStack)
	for _, bad := range []Option{WithCellNetwork("10.77.0.1/16"), WithCellNetwork("10.77.0.0/31"), WithCellNetwork("0.0.0.0/0"),
		WithCellNetwork("2001:db8::/64"), WithCellNetwork(""), WithEgressUplink(""), WithEgressUplink("a b"), WithEgressUplink("0123456789abcdef")} {
		_, err := New(bad)
		assert.Error(t, err)
	}
	assert.NoError(t, func() error { _, err := New(WithCellNetwork(DefaultCellNetwork)); return err }())
}
