package gvisor

import (
	"bytes"
	"encoding/json"
	"flag"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
)

var update = flag.Bool("update", false, "rewrite golden files")

// goldenHost is a fixed Debian-like host (merged /usr), so that golden files do not depend on the
// machine the tests run on. Its order is that of cellos.SystemPaths, as ProbeHostSystem returns.
func goldenHost() []HostEntry {
	return []HostEntry{
		{Path: "/usr", IsDir: true},
		{Path: "/bin", Symlink: "usr/bin"},
		{Path: "/sbin", Symlink: "usr/sbin"},
		{Path: "/lib", Symlink: "usr/lib"},
		{Path: "/lib64", Symlink: "usr/lib64"},
		{Path: "/etc/alternatives", IsDir: true},
		{Path: "/etc/ld.so.cache"},
	}
}

// goldenCase is one document whose config.json is kept in testdata/golden/<name>.json.
type goldenCase struct {
	name    string
	doc     string // the document's spec; the header is added by parseSpec
	docFile string // or: a cell document file whose spec is the case's (read by spec, not at init)
	cgroups bool   // the backend would give the cell cgroups (SpecInputs.CgroupsPath)
}

// spec is the case's spec: doc, or the spec of docFile. Files are read here rather than at init:
// the test binary also runs as shims, whose working directory is not the package's.
func (c goldenCase) spec(t testing.TB) string {
	t.Helper()
	if c.docFile == "" {
		return c.doc
	}
	data, err := os.ReadFile(c.docFile)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Spec json.RawMessage `json:"spec"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatalf("%s: %v", c.docFile, err)
	}
	return string(doc.Spec)
}

var goldenCases = []goldenCase{
	{name: "minimal", doc: `{"id": "minimal", "run": {"argv": ["/bin/true"]}}`},
	{name: "design-example", cgroups: true, docFile: "testdata/documents/design-example.json"},
	{name: "writable-rootfs", doc: `{
		"id": "image-rw",
		"run": {"argv": ["/bin/sh", "-c", "touch /x"]},
		"rootfs": {"path": "/srv/images/debian", "writable": true}
	}`},
	{name: "mounts", doc: `{
		"id": "mounts",
		"run": {"argv": ["/bin/ls", "/data", "/out", "/tmp", "/cache"]},
		"mounts": [
			{"type": "bind", "source": "/srv/data", "destination": "/data"},
			{"type": "bind", "source": "/srv/out", "destination": "/out", "readOnly": false},
			{"type": "tmpfs", "destination": "/tmp", "sizeBytes": 1048576},
			{"type": "tmpfs", "destination": "/cache", "readOnly": true}
		]
	}`},
	{name: "limits", cgroups: true, doc: `{
		"id": "limits",
		"run": {"argv": ["/bin/true"]},
		"resources": {"memoryBytes": 134217728, "cpuMillis": 1500}
	}`},
	{name: "user", doc: `{
		"id": "user-1000",
		"run": {"argv": ["/usr/bin/id"], "workingDir": "/tmp", "user": {"uid": 1000, "gid": 1000}}
	}`},
	{name: "labels", doc: `{
		"id": "labelled",
		"run": {
			"argv": ["/usr/bin/env"],
			"env": {"ZED": "last", "LANG": "C.UTF-8", "PATH": "/usr/bin", "A_B": "x=y"}
		},
		"labels": {"team": "ci", "app.kubernetes.io_name": "web", "tier-2": "", "z": "<&> \"quoted\""}
	}`},
}

// parseSpec parses a document given its spec, through the strict parser a supervisor uses.
func parseSpec(t testing.TB, spec string) *cellos.ExecutionCellDocument {
	t.Helper()
	doc, err := cellos.ParseDocument([]byte(`{"apiVersion": "cellos.dev/v1", "kind": "ExecutionCell", "spec": ` + spec + `}`))
	require.NoError(t, err)
	return doc
}

func (c goldenCase) inputs(doc *cellos.ExecutionCellDocument) SpecInputs {
	in := SpecInputs{HostSystem: goldenHost()}
	if c.cgroups {
		in.CgroupsPath = cgroups.Path(doc.Spec.ID)
	}
	return in
}

// build returns the config.json of the case.
func (c goldenCase) build(t testing.TB) []byte {
	t.Helper()
	doc := parseSpec(t, c.spec(t))
	data, err := MarshalSpec(BuildSpec(doc, c.inputs(doc)))
	require.NoError(t, err)
	return data
}

func TestGoldenConfig(t *testing.T) {
	for _, c := range goldenCases {
		t.Run(c.name, func(t *testing.T) {
			got := c.build(t)
			path := filepath.Join("testdata", "golden", c.name+".json")
			if *update {
				require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
				require.NoError(t, os.WriteFile(path, got, 0o644))
				return
			}
			want, err := os.ReadFile(path)
			require.NoError(t, err, "missing golden file; run `go test -run TestGoldenConfig -update` and review the diff")
			assert.Equal(t, string(want), string(got), "config.json differs from %s; if the change is intended, rerun with -update", path)
		})
	}
}

func TestGoldenFilesHaveCases(t *testing.T) {
	// A golden file whose case was removed or renamed would otherwise linger unchecked.
	files, err := filepath.Glob(filepath.Join("testdata", "golden", "*.json"))
	require.NoError(t, err)
	var names []string
	for _, c := range goldenCases {
		names = append(names, c.name)
	}
	for _, f := range files {
		assert.Contains(t, names, strings.TrimSuffix(filepath.Base(f), ".json"), "stale golden file %s", f)
	}
}

func TestSpecDeterministic(t *testing.T) {
	for _, c := range goldenCases {
		t.Run(c.name, func(t *testing.T) {
			assert.Equal(t, string(c.build(t)), string(c.build(t)))
		})
	}
}

// TestSpecMapOrder builds documents whose maps were filled in different orders: config.json must
// not depend on it (nor on Go's randomised map iteration).
func TestSpecMapOrder(t *testing.T) {
	labels := map[string]string{"team": "ci", "tier": "2", "app": "web", "owner": "ops", "a.b-c_d": "e", "z9": ""}
	env := map[string]string{"LANG": "C.UTF-8", "HOME": "/", "TZ": "UTC", "X": "1", "_Y": "2", "PATH": "/bin"}
	shuffled := func(m map[string]string) map[string]string {
		keys := slices.Collect(maps.Keys(m))
		rand.Shuffle(len(keys), func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
		out := make(map[string]string, len(m))
		for _, k := range keys {
			out[k] = m[k]
		}
		return out
	}
	build := func() []byte {
		doc := &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind, Spec: cellos.CellSpec{
			ID:     "maps",
			Run:    cellos.RunSpec{Argv: []string{"/bin/true"}, Env: shuffled(env)},
			Labels: shuffled(labels),
		}}
		require.NoError(t, doc.Validate())
		data, err := MarshalSpec(BuildSpec(doc, SpecInputs{HostSystem: goldenHost()}))
		require.NoError(t, err)
		return data
	}
	first := build()
	for range 50 {
		require.Equal(t, string(first), string(build()))
	}
	spec := decodeSpec(t, first)
	assert.Equal(t, []string{"HOME=/", "LANG=C.UTF-8", "PATH=/bin", "TZ=UTC", "X=1", "_Y=2"}, spec.Process.Env)
	assert.Len(t, spec.Annotations, len(labels)+1)
}

func decodeSpec(t testing.TB, data []byte) *specs.Spec {
	t.Helper()
	var s specs.Spec
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	require.NoError(t, dec.Decode(&s))
	return &s
}

// TestSpecInvariants checks what every cell gets, whatever its document says.
func TestSpecInvariants(t *testing.T) {
	for _, c := range goldenCases {
		t.Run(c.name, func(t *testing.T) {
			doc := parseSpec(t, c.spec(t))
			s := &doc.Spec
			data := c.build(t)
			spec := decodeSpec(t, data)

			assert.Equal(t, OCIVersion, spec.Version)
			require.NotNil(t, spec.Process)
			assert.True(t, spec.Process.NoNewPrivileges)
			assert.False(t, spec.Process.Terminal)
			assert.Equal(t, s.Run.Argv, spec.Process.Args)
			assert.True(t, slices.IsSorted(spec.Process.Env), "env %v", spec.Process.Env)
			assert.True(t, slices.ContainsFunc(spec.Process.Env, func(e string) bool { return strings.HasPrefix(e, "PATH=") }))

			// No capabilities at all: five sets, each empty. The in-memory spec has them as
			// empty lists; in config.json they are omitted, which grants none.
			caps := BuildSpec(doc, c.inputs(doc)).Process.Capabilities
			require.NotNil(t, caps)
			for name, set := range map[string][]string{"bounding": caps.Bounding, "effective": caps.Effective,
				"inheritable": caps.Inheritable, "permitted": caps.Permitted, "ambient": caps.Ambient} {
				assert.NotNil(t, set, name)
				assert.Empty(t, set, name)
			}
			require.NotNil(t, spec.Process.Capabilities)
			assert.Equal(t, specs.LinuxCapabilities{}, *spec.Process.Capabilities)

			require.NotNil(t, spec.Root)
			assert.Equal(t, "rootfs", spec.Root.Path)
			assert.Equal(t, s.Rootfs == nil || !s.Rootfs.Writable, spec.Root.Readonly)
			assert.Equal(t, s.ID, spec.Hostname)

			wantAnn := map[string]string{"cellos.dev/cell-id": s.ID}
			for k, v := range s.Labels {
				wantAnn["cellos.dev/label."+k] = v
			}
			assert.Equal(t, wantAnn, spec.Annotations)

			require.NotNil(t, spec.Linux)
			var ns []specs.LinuxNamespaceType
			for _, n := range spec.Linux.Namespaces {
				assert.Empty(t, n.Path, "a cell never joins an existing namespace")
				ns = append(ns, n.Type)
			}
			assert.ElementsMatch(t, []specs.LinuxNamespaceType{specs.PIDNamespace, specs.IPCNamespace,
				specs.UTSNamespace, specs.MountNamespace, specs.NetworkNamespace}, ns, "a private network namespace means loopback only")

			assert.NotContains(t, string(data), `"hooks"`, "runsc must never run host hooks")
			for _, esc := range []string{`\u003c`, `\u003e`, `\u0026`} {
				assert.NotContains(t, string(data), esc, "HTML escaping would mangle label values")
			}
		})
	}
}

func TestSpecUser(t *testing.T) {
	tests := []struct {
		name, user    string
		uid, gid      uint32
		cwd, docExtra string
	}{
		{name: "default", uid: 65534, gid: 65534, cwd: "/"},
		{name: "custom", user: `, "user": {"uid": 1000, "gid": 1001}`, uid: 1000, gid: 1001, cwd: "/"},
		{name: "root", user: `, "user": {"uid": 0, "gid": 0}`, uid: 0, gid: 0, cwd: "/"},
		{name: "cwd", user: `, "workingDir": "/srv"`, uid: 65534, gid: 65534, cwd: "/srv"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := parseSpec(t, `{"id": "u", "run": {"argv": ["/bin/true"]`+tt.user+`}}`)
			p := BuildSpec(doc, SpecInputs{}).Process
			assert.Equal(t, specs.User{UID: tt.uid, GID: tt.gid}, p.User)
			assert.Equal(t, tt.cwd, p.Cwd)
		})
	}
}

func TestSpecRootReadonly(t *testing.T) {
	for spec, readonly := range map[string]bool{
		`{"id": "r", "run": {"argv": ["/x"]}}`:                                                        true,
		`{"id": "r", "run": {"argv": ["/x"]}, "rootfs": {"path": "/srv/img"}}`:                        true,
		`{"id": "r", "run": {"argv": ["/x"]}, "rootfs": {"path": "/srv/img", "writable": false}}`:     true,
		`{"id": "r", "run": {"argv": ["/x"]}, "rootfs": {"path": "/srv/img", "writable": true}}`:      false,
		`{"id": "r", "run": {"argv": ["/x"]}, "mounts": [{"type": "tmpfs", "destination": "/data"}]}`: true,
	} {
		spec := BuildSpec(parseSpec(t, spec), SpecInputs{HostSystem: goldenHost()})
		assert.Equal(t, readonly, spec.Root.Readonly, spec)
	}
}

// Mounts every cell gets first.
var (
	procMount = specs.Mount{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}}
	sysMount  = specs.Mount{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}}
	tmpMount  = specs.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777", "size=536870912"}}
)

// hostMounts are the read-only binds of goldenHost: its directories and files, not its symlinks.
var hostMounts = []specs.Mount{
	{Destination: "/usr", Type: "bind", Source: "/usr", Options: []string{"rbind", "ro", "nosuid", "nodev"}},
	{Destination: "/etc/alternatives", Type: "bind", Source: "/etc/alternatives", Options: []string{"rbind", "ro", "nosuid", "nodev"}},
	{Destination: "/etc/ld.so.cache", Type: "bind", Source: "/etc/ld.so.cache", Options: []string{"bind", "ro", "nosuid", "nodev"}},
}

func TestSpecMounts(t *testing.T) {
	concat := func(parts ...[]specs.Mount) []specs.Mount { return slices.Concat(parts...) }
	base := []specs.Mount{procMount, sysMount}
	tests := []struct {
		name, extra string
		want        []specs.Mount
	}{
		{name: "host system", want: concat(base, hostMounts, []specs.Mount{tmpMount})},
		{name: "image root has no host system", extra: `, "rootfs": {"path": "/srv/img"}`,
			want: concat(base, []specs.Mount{tmpMount})},
		{name: "declared in order with defaults", extra: `, "mounts": [
				{"type": "tmpfs", "destination": "/scratch", "sizeBytes": 4096},
				{"type": "bind", "source": "/srv/b", "destination": "/b"},
				{"type": "bind", "source": "/srv/a", "destination": "/a"}]`,
			want: concat(base, hostMounts, []specs.Mount{tmpMount,
				{Destination: "/scratch", Type: "tmpfs", Source: "tmpfs", Options: []string{"rw", "nosuid", "nodev", "mode=1777", "size=4096"}},
				{Destination: "/b", Type: "bind", Source: "/srv/b", Options: []string{"rbind", "ro", "nosuid", "nodev"}},
				{Destination: "/a", Type: "bind", Source: "/srv/a", Options: []string{"rbind", "ro", "nosuid", "nodev"}},
			})},
		{name: "read-only flags as declared", extra: `, "rootfs": {"path": "/srv/img"}, "mounts": [
				{"type": "bind", "source": "/srv/rw", "destination": "/rw", "readOnly": false},
				{"type": "bind", "source": "/srv/ro", "destination": "/ro", "readOnly": true},
				{"type": "tmpfs", "destination": "/t-ro", "readOnly": true},
				{"type": "tmpfs", "destination": "/t-rw", "readOnly": false}]`,
			want: concat(base, []specs.Mount{tmpMount,
				{Destination: "/rw", Type: "bind", Source: "/srv/rw", Options: []string{"rbind", "rw", "nosuid", "nodev"}},
				{Destination: "/ro", Type: "bind", Source: "/srv/ro", Options: []string{"rbind", "ro", "nosuid", "nodev"}},
				{Destination: "/t-ro", Type: "tmpfs", Source: "tmpfs", Options: []string{"ro", "nosuid", "nodev", "mode=1777"}},
				{Destination: "/t-rw", Type: "tmpfs", Source: "tmpfs", Options: []string{"rw", "nosuid", "nodev", "mode=1777"}},
			})},
		{name: "declared /tmp replaces the default", extra: `, "mounts": [
				{"type": "tmpfs", "destination": "/tmp", "sizeBytes": 1048576}]`,
			want: concat(base, hostMounts, []specs.Mount{
				{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"rw", "nosuid", "nodev", "mode=1777", "size=1048576"}},
			})},
		{name: "bind at /tmp replaces the default", extra: `, "mounts": [
				{"type": "bind", "source": "/srv/tmp", "destination": "/tmp", "readOnly": false}]`,
			want: concat(base, hostMounts, []specs.Mount{
				{Destination: "/tmp", Type: "bind", Source: "/srv/tmp", Options: []string{"rbind", "rw", "nosuid", "nodev"}},
			})},
		{name: "below /tmp keeps the default", extra: `, "mounts": [
				{"type": "tmpfs", "destination": "/tmp/sub"}]`,
			want: concat(base, hostMounts, []specs.Mount{tmpMount,
				{Destination: "/tmp/sub", Type: "tmpfs", Source: "tmpfs", Options: []string{"rw", "nosuid", "nodev", "mode=1777"}},
			})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := parseSpec(t, `{"id": "m", "run": {"argv": ["/bin/true"]}`+tt.extra+`}`)
			assert.Equal(t, tt.want, BuildSpec(doc, SpecInputs{HostSystem: goldenHost()}).Mounts)
		})
	}
}

func TestSpecResources(t *testing.T) {
	i64 := func(v int64) *int64 { return &v }
	u64 := func(v uint64) *uint64 { return &v }
	tests := []struct {
		name, resources string
		cgroupsPath     string
		want            *specs.LinuxResources
	}{
		{name: "no limits"},
		{name: "limits without cgroups are not written", resources: `, "resources": {"memoryBytes": 67108864, "cpuMillis": 100}`},
		{name: "memory and cpu", resources: `, "resources": {"memoryBytes": 268435456, "cpuMillis": 500}`, cgroupsPath: "/cellos/res",
			want: &specs.LinuxResources{
				Memory: &specs.LinuxMemory{Limit: i64(268435456), Swap: i64(268435456)},
				CPU:    &specs.LinuxCPU{Quota: i64(50_000), Period: u64(100_000)},
			}},
		{name: "memory only", resources: `, "resources": {"memoryBytes": 67108864}`, cgroupsPath: "/cellos/res",
			want: &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(67108864), Swap: i64(67108864)}}},
		{name: "cpu only", resources: `, "resources": {"cpuMillis": 2500}`, cgroupsPath: "/cellos/res",
			want: &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: i64(250_000), Period: u64(100_000)}}},
		{name: "smallest cpu", resources: `, "resources": {"cpuMillis": 10}`, cgroupsPath: "/cellos/res",
			want: &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: i64(1000), Period: u64(100_000)}}},
		{name: "cgroups without resources", cgroupsPath: "/cellos/res"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := parseSpec(t, `{"id": "res", "run": {"argv": ["/bin/true"]}`+tt.resources+`}`)
			spec := BuildSpec(doc, SpecInputs{CgroupsPath: tt.cgroupsPath})
			assert.Equal(t, tt.cgroupsPath, spec.Linux.CgroupsPath)
			assert.Equal(t, tt.want, spec.Linux.Resources)
			data, err := MarshalSpec(spec)
			require.NoError(t, err)
			if tt.cgroupsPath == "" {
				assert.NotContains(t, string(data), `"cgroupsPath"`)
				assert.NotContains(t, string(data), `"resources"`)
			}
		})
	}
	assert.Equal(t, "/cellos/res", cgroups.Path("res"), "cgroups live under one parent owned by the library")
}

func TestMarshalSpecFormat(t *testing.T) {
	data := goldenCases[0].build(t)
	assert.True(t, bytes.HasSuffix(data, []byte("}\n")), "newline-terminated")
	assert.True(t, bytes.HasPrefix(data, []byte("{\n  \"ociVersion\": ")), "indented, ociVersion first")
	var indented bytes.Buffer
	require.NoError(t, json.Indent(&indented, data, "", "  "))
	assert.Equal(t, string(data), indented.String())
}

// configSchema compiles the config.json schema shipped in the runtime-spec module this module
// builds against.
func configSchema(t testing.TB) *jsonschema.Schema {
	t.Helper()
	// go test puts its own go first on PATH.
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/opencontainers/runtime-spec").Output()
	require.NoError(t, err, "finding the runtime-spec module: %s", stderrOf(err))
	dir := strings.TrimSpace(string(out))
	require.NotEmpty(t, dir, "the runtime-spec module is not downloaded; run `go mod download`")
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft4)
	c.UseLoader(jsonschema.SchemeURLLoader{"file": schemaLoader{}})
	sch, err := c.Compile(filepath.Join(dir, "schema", "config-schema.json"))
	require.NoError(t, err)
	return sch
}

// schemaLoader loads the runtime-spec schema files, repairing one defect of theirs: defs.json
// refers to "#definitions/uint32", a fragment that is not a JSON pointer. gojsonschema, which
// the runtime-spec's own validator uses, tolerates it; a strict compiler refuses the schema.
type schemaLoader struct{ jsonschema.FileLoader }

func (l schemaLoader) Load(url string) (any, error) {
	doc, err := l.FileLoader.Load(url)
	if err != nil {
		return nil, err
	}
	fixRefs(doc)
	return doc, nil
}

func fixRefs(v any) {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			if ref, ok := e.(string); ok && k == "$ref" && strings.HasPrefix(ref, "#definitions/") {
				v[k] = "#/" + ref[1:]
				continue
			}
			fixRefs(e)
		}
	case []any:
		for _, e := range v {
			fixRefs(e)
		}
	}
}

func stderrOf(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}

func validateConfig(sch *jsonschema.Schema, data []byte) error {
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
	if err != nil {
		return err
	}
	return sch.Validate(inst)
}

func TestSchemaConfig(t *testing.T) {
	sch := configSchema(t)
	for _, c := range goldenCases {
		t.Run(c.name, func(t *testing.T) {
			assert.NoError(t, validateConfig(sch, c.build(t)))
		})
	}
	t.Run("this host", func(t *testing.T) {
		doc := parseSpec(t, goldenCases[0].spec(t))
		data, err := MarshalSpec(BuildSpec(doc, SpecInputs{HostSystem: ProbeHostSystem(), CgroupsPath: "/cellos/minimal"}))
		require.NoError(t, err)
		assert.NoError(t, validateConfig(sch, data))
	})
}

// TestSchemaRejects shows that the schema check can fail: configs broken on purpose must not pass.
func TestSchemaRejects(t *testing.T) {
	sch := configSchema(t)
	good := goldenCases[1].build(t) // design-example: mounts, resources, annotations
	require.NoError(t, validateConfig(sch, good))
	obj := func(v any, key string) map[string]any { return v.(map[string]any)[key].(map[string]any) }
	tests := []struct {
		name    string
		breakIt func(cfg map[string]any)
		want    string // in the validation error
	}{
		{"mount without destination", func(cfg map[string]any) {
			delete(cfg["mounts"].([]any)[0].(map[string]any), "destination")
		}, "at '/mounts/0': missing property 'destination'"},
		{"no ociVersion", func(cfg map[string]any) { delete(cfg, "ociVersion") }, "missing property 'ociVersion'"},
		{"root readonly not a boolean", func(cfg map[string]any) { obj(cfg, "root")["readonly"] = "yes" },
			"at '/root/readonly': got string, want boolean"},
		{"unknown namespace", func(cfg map[string]any) {
			obj(cfg, "linux")["namespaces"].([]any)[0].(map[string]any)["type"] = "bogus"
		}, "at '/linux/namespaces/0/type'"},
		{"negative uid", func(cfg map[string]any) { obj(obj(cfg, "process"), "user")["uid"] = -1 },
			"at '/process/user/uid'"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var cfg map[string]any
			require.NoError(t, json.Unmarshal(good, &cfg))
			tt.breakIt(cfg)
			data, err := json.Marshal(cfg)
			require.NoError(t, err)
			err = validateConfig(sch, data)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestRootfsWrite(t *testing.T) {
	tests := []struct {
		name, user  string
		passwd      []string // lines etc/passwd must have
		group       []string
		notInPasswd string
	}{
		{name: "default user", passwd: []string{"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin", "root:x:0:0:root:/root:/usr/sbin/nologin"},
			group: []string{"nogroup:x:65534:"}, notInPasswd: "cell:"},
		{name: "custom uid", user: `, "user": {"uid": 1000, "gid": 1000}`,
			passwd: []string{"cell:x:1000:1000:cell:/:/usr/sbin/nologin"}, group: []string{"cell:x:1000:"}},
		{name: "custom uid default gid", user: `, "user": {"uid": 1000, "gid": 65534}`,
			passwd: []string{"cell:x:1000:65534:cell:/:/usr/sbin/nologin"}, group: []string{"nogroup:x:65534:"}},
		{name: "root", user: `, "user": {"uid": 0, "gid": 0}`,
			passwd: []string{"root:x:0:0:root:/root:/usr/sbin/nologin"}, group: []string{"root:x:0:"}, notInPasswd: "cell:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			doc := parseSpec(t, `{"id": "etc-test", "run": {"argv": ["/bin/true"]`+tt.user+`}}`)
			require.NoError(t, bundle.WriteRootfs(ownedDir(t, root), &doc.Spec, goldenHost()))

			for _, h := range goldenHost() {
				p := filepath.Join(root, h.Path)
				if h.Symlink == "" {
					// Directories and files of the host are mounts, not copies.
					_, err := os.Lstat(p)
					assert.ErrorIs(t, err, os.ErrNotExist, h.Path)
					continue
				}
				target, err := os.Readlink(p)
				if assert.NoError(t, err, h.Path) {
					assert.Equal(t, h.Symlink, target, h.Path)
				}
			}

			read := func(name string) string {
				fi, err := os.Lstat(filepath.Join(root, "etc", name))
				require.NoError(t, err)
				require.True(t, fi.Mode().IsRegular(), "%s is a regular file", name)
				assert.Zero(t, fi.Mode().Perm()&0o022, "%s is writable only by its owner", name)
				data, err := os.ReadFile(filepath.Join(root, "etc", name))
				require.NoError(t, err)
				return string(data)
			}
			passwd, group := read("passwd"), read("group")
			for _, l := range tt.passwd {
				assert.Contains(t, strings.Split(passwd, "\n"), l)
			}
			for _, l := range tt.group {
				assert.Contains(t, strings.Split(group, "\n"), l)
			}
			if tt.notInPasswd != "" {
				assert.NotContains(t, passwd, tt.notInPasswd)
			}
			assert.Contains(t, strings.Split(read("hosts"), "\n"), "127.0.0.1\tlocalhost etc-test")
			assert.Equal(t, "etc-test\n", read("hostname"))
			assert.Empty(t, read("resolv.conf"), "no name servers: a cell has no network")

			entries, err := os.ReadDir(filepath.Join(root, "etc"))
			require.NoError(t, err)
			var names []string
			for _, e := range entries {
				names = append(names, e.Name())
			}
			assert.Equal(t, []string{"group", "hostname", "hosts", "passwd", "resolv.conf"}, names,
				"nothing of the host's /etc but what is mounted")
		})
	}
}

// TestRootfsUsersResolve checks that the user a cell runs as has a name: what `id` or `whoami`
// inside the cell would print.
func TestRootfsUsersResolve(t *testing.T) {
	for _, u := range []cellos.UserSpec{{UID: 0, GID: 0}, {UID: 1000, GID: 1000}, {UID: 1000, GID: 65534}, {UID: 65534, GID: 2000}, {UID: 65534, GID: 65534}} {
		spec := &cellos.CellSpec{ID: "u", Run: cellos.RunSpec{Argv: []string{"/x"}, User: &u}}
		files := bundle.EtcFiles(spec)
		assert.True(t, hasEntry(files["passwd"], u.UID), "passwd has uid %d:\n%s", u.UID, files["passwd"])
		assert.True(t, hasEntry(files["group"], u.GID), "group has gid %d:\n%s", u.GID, files["group"])
	}
}

// hasEntry reports whether an /etc/passwd or /etc/group text has a line with id in its third field.
func hasEntry(text string, id uint32) bool {
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		if f := strings.Split(line, ":"); len(f) >= 3 && f[2] == strconv.FormatUint(uint64(id), 10) {
			return true
		}
	}
	return false
}
