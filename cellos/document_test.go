package cellos_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// exampleDoc is the example document of the cell document format, verbatim
// (testdata/documents/design-example.json).
var exampleDoc = func() string {
	data, err := os.ReadFile("../testdata/documents/design-example.json")
	if err != nil {
		panic(err)
	}
	return string(data)
}()

// exampleWithEgress is the example with the egress rule the format's example shows: valid as a document (the
// gVisor backend refuses it later with ErrUnsupported, not Validate).
var exampleWithEgress = strings.Replace(exampleDoc, `"egress": []`,
	`"egress": [{"cidr": "203.0.113.0/24", "port": 443, "protocol": "tcp"}]`, 1)

const minimalDoc = `{"apiVersion":"cellos.dev/v1","kind":"ExecutionCell","spec":{"id":"a","run":{"argv":["/bin/true"]}}}`

const exampleID = "build-42"

// M is a document as generic JSON, for editing.
type M = map[string]any

func decodeMap(doc string) M {
	var m M
	if err := json.Unmarshal([]byte(doc), &m); err != nil {
		panic(err)
	}
	return m
}

// obj returns the object at keys below m, creating empty objects on the way.
func obj(m M, keys ...string) M {
	for _, k := range keys {
		next, ok := m[k].(M)
		if !ok {
			next = M{}
			m[k] = next
		}
		m = next
	}
	return m
}

// mountAt returns the i-th mount of the example.
func mountAt(m M, i int) M { return obj(m, "spec")["mounts"].([]any)[i].(M) }

// edit returns the example document changed by f.
func edit(f func(d M)) string { return editDoc(exampleDoc, f) }

// editMin returns the minimal document changed by f.
func editMin(f func(d M)) string { return editDoc(minimalDoc, f) }

func editDoc(doc string, f func(d M)) string {
	m := decodeMap(doc)
	f(m)
	b, err := json.Marshal(m)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// replaced returns the example with old replaced by new; old must occur.
func replaced(old, new string) string {
	if !strings.Contains(exampleDoc, old) {
		panic("not in the example: " + old)
	}
	return strings.Replace(exampleDoc, old, new, 1)
}

func setSpec(key string, v any) func(M) { return func(d M) { obj(d, "spec")[key] = v } }
func setRun(key string, v any) func(M)  { return func(d M) { obj(d, "spec", "run")[key] = v } }

func setMounts(ms ...M) func(M) {
	return func(d M) {
		l := make([]any, len(ms))
		for i, m := range ms {
			l[i] = m
		}
		obj(d, "spec")["mounts"] = l
	}
}

func bindM(src, dst string) M { return M{"type": "bind", "source": src, "destination": dst} }
func tmpfsM(dst string) M     { return M{"type": "tmpfs", "destination": dst} }

func setEgress(rules ...M) func(M) {
	return func(d M) {
		l := make([]any, len(rules))
		for i, r := range rules {
			l[i] = r
		}
		obj(d, "spec", "network")["egress"] = l
	}
}

func rule(cidr string, port int, proto string) M {
	return M{"cidr": cidr, "port": port, "protocol": proto}
}

func noRootfs(d M) { delete(obj(d, "spec"), "rootfs") }

func both(fs ...func(M)) func(M) {
	return func(d M) {
		for _, f := range fs {
			f(d)
		}
	}
}

var otherKinds = []error{cellos.ErrHost, cellos.ErrNotTracked, cellos.ErrAlreadyExists, cellos.ErrUnsupported}

// requireInvalidSpec checks that err is an *Error of kind ErrInvalidSpec and of no other kind.
func requireInvalidSpec(t *testing.T, err error) *cellos.Error {
	t.Helper()
	require.Error(t, err)
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
	for _, k := range otherKinds {
		require.NotErrorIs(t, err, k)
	}
	var e *cellos.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, cellos.ErrInvalidSpec, e.Kind)
	return e
}

func TestParseDocumentExample(t *testing.T) {
	doc, err := cellos.ParseDocument([]byte(exampleDoc))
	require.NoError(t, err)
	require.NoError(t, doc.Validate())

	ro := true
	want := &cellos.ExecutionCellDocument{
		APIVersion: "cellos.dev/v1",
		Kind:       "ExecutionCell",
		Spec: cellos.CellSpec{
			ID: "build-42",
			Run: cellos.RunSpec{
				Argv:       []string{"/bin/sh", "-c", "echo hello"},
				Env:        map[string]string{"LANG": "C.UTF-8"},
				WorkingDir: "/",
				User:       &cellos.UserSpec{UID: 65534, GID: 65534},
			},
			Rootfs: &cellos.RootfsSpec{Path: "/srv/images/alpine"},
			Mounts: []cellos.MountSpec{
				{Type: "bind", Source: "/srv/data", Destination: "/data", ReadOnly: &ro},
				{Type: "tmpfs", Destination: "/scratch", SizeBytes: 67108864},
			},
			Resources: &cellos.ResourceSpec{MemoryBytes: 268435456, CPUMillis: 500},
			Network:   &cellos.NetworkSpec{Egress: []cellos.EgressRule{}},
			Lifetime:  &cellos.LifetimeSpec{TTLSeconds: 30},
			Labels:    map[string]string{"team": "ci"},
		},
	}
	assert.Equal(t, want, doc)
	assert.True(t, doc.Spec.Mounts[0].IsReadOnly())
	assert.False(t, doc.Spec.Mounts[1].IsReadOnly())
	assert.True(t, doc.Spec.WantsCgroups())
	assert.Equal(t, int64(30), doc.Spec.TTLSeconds())

	t.Run("with egress rule", func(t *testing.T) {
		doc, err := cellos.ParseDocument([]byte(exampleWithEgress))
		require.NoError(t, err)
		require.NoError(t, doc.Validate())
		require.NotNil(t, doc.Spec.Network)
		assert.Equal(t, []cellos.EgressRule{{CIDR: "203.0.113.0/24", Port: 443, Protocol: "tcp"}}, doc.Spec.Network.Egress)
	})
}

func TestParseDocumentMinimal(t *testing.T) {
	doc, err := cellos.ParseDocument([]byte(minimalDoc))
	require.NoError(t, err)
	s := doc.Spec
	assert.Equal(t, "a", s.ID)
	assert.Equal(t, []string{"/bin/true"}, s.Run.Argv)
	assert.Nil(t, s.Rootfs)
	assert.Nil(t, s.Mounts)
	assert.Nil(t, s.Resources)
	assert.Nil(t, s.Network)
	assert.Nil(t, s.Lifetime)
	assert.Nil(t, s.Labels)
	assert.Nil(t, s.Run.User)
	assert.Equal(t, cellos.UserSpec{UID: 65534, GID: 65534}, s.Run.EffectiveUser())
	assert.Equal(t, "/", s.Run.EffectiveWorkingDir())
	assert.Equal(t, []string{"PATH=" + cellos.DefaultPath}, s.Run.EffectiveEnv())
	assert.Equal(t, int64(0), s.TTLSeconds())
	assert.False(t, s.WantsCgroups())
}

// TestParseDocumentValid lists documents that must be accepted, boundaries included.
func TestParseDocumentValid(t *testing.T) {
	for _, tc := range validCases() {
		t.Run(tc.name, func(t *testing.T) {
			doc, err := cellos.ParseDocument([]byte(tc.doc))
			require.NoError(t, err)
			require.NotNil(t, doc)
			require.NoError(t, doc.Validate())
		})
	}
}

type validCase struct {
	name string
	doc  string
}

func validCases() []validCase {
	long := func(c byte, n int) string { return strings.Repeat(string(c), n) }
	args := func(n int) []any {
		l := make([]any, n)
		l[0] = "/bin/true"
		for i := 1; i < n; i++ {
			l[i] = "x"
		}
		return l
	}
	mounts := func(n int) func(M) {
		return func(d M) {
			ms := make([]M, n)
			for i := range ms {
				ms[i] = tmpfsM(fmt.Sprintf("/m%d", i))
			}
			setMounts(ms...)(d)
		}
	}
	return []validCase{
		{"example", exampleDoc},
		{"example with egress", exampleWithEgress},
		{"minimal", minimalDoc},
		{"trailing whitespace", exampleDoc + "\n\t \n"},
		{"exactly MaxDocumentBytes", exampleDoc + long(' ', cellos.MaxDocumentBytes-len(exampleDoc))},
		{"null optional sections", editMin(func(d M) {
			s := obj(d, "spec")
			for _, k := range []string{"rootfs", "mounts", "resources", "network", "lifetime", "labels"} {
				s[k] = nil
			}
			obj(d, "spec", "run")["user"] = nil
			obj(d, "spec", "run")["env"] = nil
		})},
		{"id single letter", editMin(setSpec("id", "Z"))},
		{"id single digit", editMin(setSpec("id", "7"))},
		{"id with all allowed characters", editMin(setSpec("id", "a.b_c-D9"))},
		{"id with trailing dash", editMin(setSpec("id", "x-"))},
		{"id with dots inside", editMin(setSpec("id", "a..b"))},
		{"id 64 chars", editMin(setSpec("id", long('a', 64)))},
		{"MaxArgs arguments", editMin(setRun("argv", args(cellos.MaxArgs)))},
		{"argv and env exactly MaxArgEnvBytes", editMin(both(
			// "/bin/true\0" is 10 bytes, "PATH=/x\0" is 8 bytes: the rest goes to argv[1] and its NUL.
			setRun("argv", []any{"/bin/true", long('y', cellos.MaxArgEnvBytes-10-8-1)}),
			setRun("env", M{"PATH": "/x"}),
		))},
		{"env names", editMin(setRun("env", M{"_x": "1", "lower_case": "2", "A1": "3", "PATH": "/bin"}))},
		{"empty env value", editMin(setRun("env", M{"EMPTY": ""}))},
		{"workingDir absolute", editMin(setRun("workingDir", "/work/dir"))},
		{"uid 0", editMin(setRun("user", M{"uid": 0, "gid": 0}))},
		{"uid max-1", editMin(setRun("user", M{"uid": 4294967294, "gid": 4294967294}))},
		{"writable rootfs", edit(func(d M) { obj(d, "spec", "rootfs")["writable"] = true })},
		{"image rootfs", edit(setSpec("rootfs", M{"image": "registry.example/team/python:3.12"}))},
		{"image by digest, writable", edit(setSpec("rootfs", M{"image": "registry.example/team/python@sha256:" + long('a', 64), "writable": true}))},
		{"image from an OCI layout", edit(setSpec("rootfs", M{"image": "oci-layout:/srv/images/layout:tag"}))},
		{"image without argv", edit(both(setSpec("rootfs", M{"image": "busybox"}), func(d M) { delete(obj(d, "spec", "run"), "argv") }))},
		{"image with argv null", edit(both(setSpec("rootfs", M{"image": "busybox"}), setRun("argv", nil)))},
		{"destination similar to reserved", edit(setMounts(tmpfsM("/procx"), tmpfsM("/devices"), tmpfsM("/system")))},
		{"mount inside an earlier tmpfs", edit(setMounts(tmpfsM("/scratch"), tmpfsM("/scratch/inner"), bindM("/srv", "/scratch/b")))},
		{"sibling binds", edit(setMounts(bindM("/srv/a", "/data"), bindM("/srv/b", "/data2")))},
		{"bind readOnly false", edit(func(d M) { mountAt(d, 0)["readOnly"] = false })},
		{"system path destination with rootfs", edit(setMounts(bindM("/opt/tools", "/usr/local"), tmpfsM("/etc")))},
		{"non-system destination without rootfs", edit(both(noRootfs, setMounts(tmpfsM("/etc/hosts.d"), tmpfsM("/opt"), tmpfsM("/usrx"))))},
		{"MaxMounts mounts", edit(mounts(cellos.MaxMounts))},
		{"memory minimum", edit(func(d M) { obj(d, "spec", "resources")["memoryBytes"] = cellos.MinMemoryBytes })},
		{"cpu bounds low", edit(func(d M) { obj(d, "spec", "resources")["cpuMillis"] = cellos.MinCPUMillis })},
		{"cpu bounds high", edit(func(d M) { obj(d, "spec", "resources")["cpuMillis"] = cellos.MaxCPUMillis })},
		{"empty resources", edit(setSpec("resources", M{}))},
		{"pids positive is document-valid", edit(func(d M) { obj(d, "spec", "resources")["pids"] = 100 })},
		{"egress rules", edit(setEgress(rule("2001:db8::/32", 53, "udp"), rule("0.0.0.0/0", 65535, "tcp"), rule("192.0.2.7/32", 1, "tcp")))},
		{"empty network", edit(setSpec("network", M{}))},
		{"ttl zero", edit(setSpec("lifetime", M{"ttlSeconds": 0}))},
		{"ttl max", edit(setSpec("lifetime", M{"ttlSeconds": cellos.MaxTTLSeconds}))},
		{"label key 63 chars and value at the limit", edit(setSpec("labels", M{long('k', 63): long('v', cellos.MaxLabelValue)}))},
		{"label key punctuation", edit(setSpec("labels", M{"a.b-c_d": "", "x": "y"}))},
		{"unicode string values", edit(setSpec("labels", M{"who": "Zoë ✓"}))},
		{"escaped keys", replaced(`"apiVersion"`, `"\u0061piVersion"`)},
		{"escaped key of a user id", replaced(`"gid"`, `"\u0067id"`)},
		{"escaped values", replaced(`"echo hello"`, `"echo \"h\u00e9llo\" \ud83d\ude00 \/\\\b\f\n\r\t"`)},
		{"lone surrogates and invalid UTF-8 in values", replaced(`"team": "ci"`, `"team": "\udc00 \ud800x \ud800\u0041 \ud800`+"\xff\xfe"+`"`)},
		{"null user", editMin(setRun("user", nil))},
		{"user ids in any order", editMin(setRun("user", M{"gid": 7, "uid": 1000}))},
		{"all whitespace kinds", strings.ReplaceAll(exampleDoc, "\n", "\r\n\t ")},
		{"int64 extremes where documents allow them", replaced(`"pids": 0`, `"pids": 9223372036854775807`)},
		{"negative zero", replaced(`"pids": 0`, `"pids": -0`)},
	}
}

type badCase struct {
	name  string
	doc   string
	field string // a path cellos.Fields must report; "" when the problem is the document as a whole
	msg   string // a substring of the message, besides the field
	shape bool   // found while decoding: a Go-built document cannot have it
	noID  bool   // the message cannot name the cell (its id is invalid or unreadable)
}

func badCases() []badCase {
	long := func(c byte, n int) string { return strings.Repeat(string(c), n) }
	unknown := func(keys ...string) func(M) { return func(d M) { obj(d, keys...)["bogus"] = 1 } }
	manyArgs := make([]any, cellos.MaxArgs+1)
	for i := range manyArgs {
		manyArgs[i] = "x"
	}
	manyEnv := M{}
	for i := range cellos.MaxEnv + 1 {
		manyEnv[fmt.Sprintf("V%d", i)] = ""
	}
	manyMounts := make([]M, cellos.MaxMounts+1)
	for i := range manyMounts {
		manyMounts[i] = tmpfsM(fmt.Sprintf("/m%d", i))
	}
	manyRules := make([]M, cellos.MaxEgressRules+1)
	for i := range manyRules {
		manyRules[i] = rule("10.0.0.0/8", 443, "tcp")
	}
	manyLabels := M{}
	for i := range cellos.MaxLabels + 1 {
		manyLabels[fmt.Sprintf("l%d", i)] = "v"
	}

	return []badCase{
		// Header.
		{name: "apiVersion wrong", doc: edit(func(d M) { d["apiVersion"] = "cellos.dev/v2" }), field: "apiVersion", msg: "cellos.dev/v2"},
		{name: "apiVersion missing", doc: edit(func(d M) { delete(d, "apiVersion") }), field: "apiVersion"},
		{name: "kind wrong", doc: edit(func(d M) { d["kind"] = "Pod" }), field: "kind", msg: "Pod"},
		{name: "kind in other case", doc: edit(func(d M) { d["kind"] = "executioncell" }), field: "kind"},
		{name: "apiVersion not a string", doc: edit(func(d M) { d["apiVersion"] = 1 }), field: "apiVersion", shape: true},

		// Unknown fields at every level.
		{name: "unknown top", doc: edit(unknown()), field: "bogus", msg: "unknown field", shape: true},
		{name: "unknown spec", doc: edit(unknown("spec")), field: "spec.bogus", msg: "unknown field", shape: true},
		{name: "unknown run", doc: edit(unknown("spec", "run")), field: "spec.run.bogus", msg: "unknown field", shape: true},
		{name: "unknown user", doc: edit(unknown("spec", "run", "user")), field: "spec.run.user.bogus", msg: "unknown field", shape: true},
		{name: "unknown rootfs", doc: edit(unknown("spec", "rootfs")), field: "spec.rootfs.bogus", msg: "unknown field", shape: true},
		{name: "unknown mounts[1]", doc: edit(func(d M) { mountAt(d, 1)["bogus"] = true }), field: "spec.mounts[1].bogus", msg: "unknown field", shape: true},
		{name: "unknown resources", doc: edit(unknown("spec", "resources")), field: "spec.resources.bogus", msg: "unknown field", shape: true},
		{name: "unknown network", doc: edit(unknown("spec", "network")), field: "spec.network.bogus", msg: "unknown field", shape: true},
		{name: "unknown egress[1]", doc: edit(setEgress(rule("10.0.0.0/8", 1, "tcp"), M{"cidr": "10.0.0.0/8", "port": 1, "protocol": "tcp", "ports": []any{2}})),
			field: "spec.network.egress[1].ports", msg: "unknown field", shape: true},
		{name: "unknown lifetime", doc: edit(unknown("spec", "lifetime")), field: "spec.lifetime.bogus", msg: "unknown field", shape: true},
		{name: "typo drops a limit", doc: replaced(`"memoryBytes"`, `"memoryByte"`), field: "spec.resources.memoryByte", msg: "unknown field", shape: true},

		// Keys in the wrong case: encoding/json alone would accept them.
		{name: "wrong case MemoryBytes", doc: replaced(`"memoryBytes"`, `"MemoryBytes"`), field: "spec.resources.MemoryBytes", msg: `did you mean "memoryBytes"?`, shape: true},
		{name: "wrong case Argv", doc: replaced(`"argv"`, `"ARGV"`), field: "spec.run.ARGV", msg: `did you mean "argv"?`, shape: true},
		{name: "wrong case TTLSeconds", doc: replaced(`"ttlSeconds"`, `"TTLSeconds"`), field: "spec.lifetime.TTLSeconds", msg: `did you mean "ttlSeconds"?`, shape: true},
		{name: "wrong case via Kelvin sign", doc: replaced(`"kind"`, `"\u212aind"`), field: "\u212aind", msg: "unknown field", shape: true},

		// Duplicate keys: encoding/json alone keeps the last.
		{name: "duplicate top key", doc: replaced(`"kind": "ExecutionCell",`, `"kind": "ExecutionCell", "kind": "ExecutionCell",`), field: "kind", msg: "duplicate key", shape: true},
		{name: "duplicate resource key", doc: replaced(`"cpuMillis": 500`, `"cpuMillis": 500, "cpuMillis": 0`), field: "spec.resources.cpuMillis", msg: "duplicate key", shape: true},
		{name: "duplicate mount key", doc: replaced(`"readOnly": true`, `"readOnly": true, "readOnly": false`), field: "spec.mounts[0].readOnly", msg: "duplicate key", shape: true},
		{name: "duplicate env key", doc: replaced(`"LANG": "C.UTF-8"`, `"LANG": "C.UTF-8", "LANG": "C"`), field: "spec.run.env.LANG", msg: "duplicate key", shape: true},
		{name: "duplicate label key", doc: replaced(`"team": "ci"`, `"team": "ci", "team": "cd"`), field: "spec.labels.team", msg: "duplicate key", shape: true},
		{name: "duplicate key via escape", doc: replaced(`"pids": 0`, `"pids": 0, "\u0070ids": 0`), field: "spec.resources.pids", msg: "duplicate key", shape: true},
		{name: "duplicate id via escape", doc: replaced(`"id": "build-42",`, `"id": "build-42", "\u0069d": "other",`), field: "spec.id", msg: "duplicate key", shape: true},
		{name: "duplicate escaped before plain", doc: replaced(`"id": "build-42",`, `"\u0069d": "build-42", "id": "build-42",`), field: "spec.id", msg: "duplicate key", shape: true},
		{name: "duplicate gid via escape", doc: replaced(`"gid": 65534`, `"gid": 65534, "\u0067id": 0`), field: "spec.run.user.gid", msg: "duplicate key", shape: true},
		{name: "duplicate env key via escape", doc: replaced(`"LANG": "C.UTF-8"`, `"LANG": "C.UTF-8", "L\u0041NG": "C"`), field: "spec.run.env.LANG", msg: "duplicate key", shape: true},
		{name: "duplicate spec", doc: replaced(`"kind": "ExecutionCell",`, `"kind": "ExecutionCell", "spec": null,`), field: "spec", msg: "duplicate key", shape: true, noID: true},

		// Whole-document problems.
		{name: "trailing object", doc: exampleDoc + "{}", msg: "trailing data", shape: true},
		{name: "trailing garbage", doc: exampleDoc + " x", msg: "trailing data", shape: true},
		{name: "second document", doc: exampleDoc + exampleDoc, msg: "trailing data", shape: true},
		{name: "above MaxDocumentBytes", doc: exampleDoc + long(' ', cellos.MaxDocumentBytes-len(exampleDoc)+1), msg: fmt.Sprint(cellos.MaxDocumentBytes), shape: true},
		{name: "far above MaxDocumentBytes", doc: edit(setSpec("labels", M{"big": long('v', 2*cellos.MaxDocumentBytes)})), msg: "limit", shape: true},
		{name: "empty input", doc: "", shape: true, noID: true},
		{name: "malformed", doc: `{"apiVersion": "cellos.dev/v1",,}`, msg: "malformed JSON", shape: true, noID: true},
		{name: "truncated after the id", doc: exampleDoc[:strings.Index(exampleDoc, `"run"`)], shape: true},
		{name: "not an object", doc: `["cellos.dev/v1"]`, field: "(document)", msg: "expected an object", shape: true, noID: true},
		{name: "null document", doc: `null`, field: "apiVersion", noID: true},
		{name: "spec not an object", doc: edit(func(d M) { d["spec"] = []any{} }), field: "spec", msg: "expected an object", shape: true, noID: true},
		{name: "argv not an array", doc: edit(setRun("argv", "/bin/sh -c true")), field: "spec.run.argv", msg: "expected an array", shape: true},
		{name: "env value an object", doc: edit(setRun("env", M{"A": M{}})), field: "spec.run.env.A", shape: true},
		{name: "memory a string", doc: edit(func(d M) { obj(d, "spec", "resources")["memoryBytes"] = "1G" }), field: "spec.resources.memoryBytes", shape: true},
		{name: "memory fractional", doc: replaced(`268435456`, `2.5e8`), field: "spec.resources.memoryBytes", shape: true},
		{name: "writable a string", doc: replaced(`"writable": false`, `"writable": "false"`), field: "spec.rootfs.writable", shape: true},

		// id.
		{name: "id missing", doc: edit(func(d M) { delete(obj(d, "spec"), "id") }), field: "spec.id", noID: true},
		{name: "id empty", doc: edit(setSpec("id", "")), field: "spec.id", noID: true},
		{name: "id ../x", doc: edit(setSpec("id", "../x")), field: "spec.id", noID: true},
		{name: "id a/b", doc: edit(setSpec("id", "a/b")), field: "spec.id", noID: true},
		{name: "id -x", doc: edit(setSpec("id", "-x")), field: "spec.id", noID: true},
		{name: "id .x", doc: edit(setSpec("id", ".x")), field: "spec.id", noID: true},
		{name: "id _x", doc: edit(setSpec("id", "_x")), field: "spec.id", noID: true},
		{name: "id ..", doc: edit(setSpec("id", "..")), field: "spec.id", noID: true},
		{name: "id 65 chars", doc: edit(setSpec("id", long('a', 65))), field: "spec.id", noID: true},
		{name: "id with NUL", doc: edit(setSpec("id", "a\x00b")), field: "spec.id", noID: true},
		{name: "id unicode", doc: edit(setSpec("id", "zoë")), field: "spec.id", noID: true},
		{name: "id with space", doc: edit(setSpec("id", "a b")), field: "spec.id", noID: true},
		{name: "id with trailing newline", doc: edit(setSpec("id", "abc\n")), field: "spec.id", noID: true},
		{name: "id a number", doc: edit(setSpec("id", 42)), field: "spec.id", shape: true, noID: true},

		// run.argv.
		{name: "argv missing", doc: edit(func(d M) { delete(obj(d, "spec", "run"), "argv") }), field: "spec.run.argv"},
		{name: "argv null", doc: edit(setRun("argv", nil)), field: "spec.run.argv"},
		{name: "argv empty", doc: edit(setRun("argv", []any{})), field: "spec.run.argv"},
		{name: "argv[0] empty", doc: edit(setRun("argv", []any{"", "x"})), field: "spec.run.argv[0]"},
		{name: "argv NUL", doc: edit(setRun("argv", []any{"/bin/sh", "-c", "echo\x00hi"})), field: "spec.run.argv[2]", msg: "NUL"},
		{name: "argv too many", doc: edit(setRun("argv", manyArgs)), field: "spec.run.argv", msg: fmt.Sprint(cellos.MaxArgs)},
		{name: "argv too many bytes", doc: editMin(setRun("argv", []any{"/bin/true", long('y', cellos.MaxArgEnvBytes)})), field: "spec.run", msg: fmt.Sprint(cellos.MaxArgEnvBytes)},
		{name: "argv and env one byte too many", doc: editMin(both(
			setRun("argv", []any{"/bin/true", long('y', cellos.MaxArgEnvBytes-10-8)}),
			setRun("env", M{"PATH": "/x"}),
		)), field: "spec.run"},
		{name: "env too many bytes", doc: edit(setRun("env", M{"BIG": long('v', cellos.MaxArgEnvBytes)})), field: "spec.run"},

		// run.env.
		{name: "env key leading digit", doc: edit(setRun("env", M{"1A": "x"})), field: "spec.run.env", msg: "POSIX"},
		{name: "env key dash", doc: edit(setRun("env", M{"A-B": "x"})), field: "spec.run.env"},
		{name: "env key with =", doc: edit(setRun("env", M{"A=B": "x"})), field: "spec.run.env"},
		{name: "env key empty", doc: edit(setRun("env", M{"": "x"})), field: "spec.run.env"},
		{name: "env key NUL", doc: edit(setRun("env", M{"A\x00": "x"})), field: "spec.run.env"},
		{name: "env key unicode", doc: edit(setRun("env", M{"É": "x"})), field: "spec.run.env"},
		{name: "env value NUL", doc: edit(setRun("env", M{"LANG": "C\x00x"})), field: "spec.run.env.LANG", msg: "NUL"},
		{name: "env too many", doc: edit(setRun("env", manyEnv)), field: "spec.run.env", msg: fmt.Sprint(cellos.MaxEnv)},

		// run.workingDir.
		{name: "workingDir relative", doc: edit(setRun("workingDir", "work")), field: "spec.run.workingDir", msg: "absolute"},
		{name: "workingDir dotdot", doc: edit(setRun("workingDir", "/a/../b")), field: "spec.run.workingDir", msg: `"/b"`},
		{name: "workingDir trailing slash", doc: edit(setRun("workingDir", "/work/")), field: "spec.run.workingDir", msg: "clean"},
		{name: "workingDir double slash", doc: edit(setRun("workingDir", "//work")), field: "spec.run.workingDir"},
		{name: "workingDir dot", doc: edit(setRun("workingDir", "/work/.")), field: "spec.run.workingDir"},
		{name: "workingDir NUL", doc: edit(setRun("workingDir", "/wo\x00rk")), field: "spec.run.workingDir"},
		{name: "workingDir too long", doc: edit(setRun("workingDir", "/"+long('d', cellos.MaxPathBytes))), field: "spec.run.workingDir"},

		// run.user.
		{name: "uid 4294967295", doc: edit(setRun("user", M{"uid": 4294967295, "gid": 1})), field: "spec.run.user.uid"},
		{name: "gid 4294967295", doc: edit(setRun("user", M{"uid": 1, "gid": 4294967295})), field: "spec.run.user.gid"},
		{name: "uid negative", doc: edit(setRun("user", M{"uid": -1, "gid": 1})), field: "spec.run.user.uid", shape: true},
		{name: "uid above 32 bits", doc: edit(setRun("user", M{"uid": 4294967296, "gid": 1})), field: "spec.run.user.uid", shape: true},
		{name: "uid negative zero", doc: replaced(`"uid": 65534`, `"uid": -0`), field: "spec.run.user.uid", shape: true},
		{name: "user without gid", doc: edit(setRun("user", M{"uid": 1000})), field: "spec.run.user.gid",
			msg: "spec.run.user.gid: is required when user is given", shape: true},
		{name: "user without uid", doc: edit(setRun("user", M{"gid": 1000})), field: "spec.run.user.uid",
			msg: "spec.run.user.uid: is required when user is given", shape: true},
		{name: "user without ids", doc: edit(setRun("user", M{})), field: "spec.run.user.gid", msg: "is required when user is given", shape: true},
		{name: "user with gid null", doc: edit(setRun("user", M{"uid": 1000, "gid": nil})), field: "spec.run.user.gid",
			msg: "is required when user is given", shape: true},
		{name: "user root without gid", doc: edit(setRun("user", M{"uid": 0})), field: "spec.run.user.gid", shape: true},

		// rootfs.
		{name: "rootfs relative", doc: edit(func(d M) { obj(d, "spec", "rootfs")["path"] = "srv/images" }), field: "spec.rootfs.path", msg: "absolute"},
		{name: "rootfs unclean", doc: edit(func(d M) { obj(d, "spec", "rootfs")["path"] = "/srv/../etc" }), field: "spec.rootfs.path", msg: "clean"},
		{name: "rootfs trailing slash", doc: edit(func(d M) { obj(d, "spec", "rootfs")["path"] = "/srv/images/" }), field: "spec.rootfs.path"},
		{name: "rootfs /", doc: edit(func(d M) { obj(d, "spec", "rootfs")["path"] = "/" }), field: "spec.rootfs.path", msg: "root"},
		{name: "rootfs path missing", doc: edit(setSpec("rootfs", M{"writable": true})), field: "spec.rootfs.path", msg: "or spec.rootfs.image"},
		{name: "rootfs path and image", doc: edit(setSpec("rootfs", M{"path": "/srv/x", "image": "busybox"})), field: "spec.rootfs", msg: "exclusive"},
		{name: "image with a space", doc: edit(setSpec("rootfs", M{"image": "busy box"})), field: "spec.rootfs.image", msg: "space"},
		{name: "image with a newline", doc: edit(setSpec("rootfs", M{"image": "busybox\n"})), field: "spec.rootfs.image", msg: "control"},
		{name: "image too long", doc: edit(setSpec("rootfs", M{"image": long('a', cellos.MaxImageRefBytes+1)})), field: "spec.rootfs.image", msg: fmt.Sprint(cellos.MaxImageRefBytes)},
		{name: "image a number", doc: edit(setSpec("rootfs", M{"image": 7})), field: "spec.rootfs.image", shape: true},
		{name: "image with empty argv", doc: edit(both(setSpec("rootfs", M{"image": "busybox"}), setRun("argv", []any{}))), field: "spec.run.argv", msg: "leave it out"},
		{name: "image with empty argv[0]", doc: edit(both(setSpec("rootfs", M{"image": "busybox"}), setRun("argv", []any{""}))), field: "spec.run.argv[0]"},

		// mounts.
		{name: "mount type unknown", doc: edit(func(d M) { mountAt(d, 0)["type"] = "overlay" }), field: "spec.mounts[0].type", msg: "overlay"},
		{name: "mount type missing", doc: edit(func(d M) { delete(mountAt(d, 1), "type") }), field: "spec.mounts[1].type"},
		{name: "mount type in other case", doc: edit(func(d M) { mountAt(d, 0)["type"] = "Bind" }), field: "spec.mounts[0].type"},
		{name: "bind without source", doc: edit(func(d M) { delete(mountAt(d, 0), "source") }), field: "spec.mounts[0].source", msg: "required"},
		{name: "bind source relative", doc: edit(func(d M) { mountAt(d, 0)["source"] = "srv/data" }), field: "spec.mounts[0].source"},
		{name: "bind source unclean", doc: edit(func(d M) { mountAt(d, 0)["source"] = "/srv/data/../../etc" }), field: "spec.mounts[0].source"},
		{name: "bind with sizeBytes", doc: edit(func(d M) { mountAt(d, 0)["sizeBytes"] = 4096 }), field: "spec.mounts[0].sizeBytes"},
		{name: "tmpfs with source", doc: edit(func(d M) { mountAt(d, 1)["source"] = "/srv/x" }), field: "spec.mounts[1].source"},
		{name: "tmpfs size negative", doc: edit(func(d M) { mountAt(d, 1)["sizeBytes"] = -1 }), field: "spec.mounts[1].sizeBytes"},
		{name: "destination missing", doc: edit(func(d M) { delete(mountAt(d, 1), "destination") }), field: "spec.mounts[1].destination"},
		{name: "destination relative", doc: edit(func(d M) { mountAt(d, 1)["destination"] = "scratch" }), field: "spec.mounts[1].destination", msg: "absolute"},
		{name: "destination dotdot", doc: edit(func(d M) { mountAt(d, 1)["destination"] = "/scratch/../../proc" }), field: "spec.mounts[1].destination", msg: "clean"},
		{name: "destination trailing slash", doc: edit(func(d M) { mountAt(d, 0)["destination"] = "/data/" }), field: "spec.mounts[0].destination"},
		{name: "destination /", doc: edit(func(d M) { mountAt(d, 1)["destination"] = "/" }), field: "spec.mounts[1].destination", msg: "root"},
		{name: "destination /proc", doc: edit(func(d M) { mountAt(d, 1)["destination"] = "/proc" }), field: "spec.mounts[1].destination", msg: "/proc"},
		{name: "destination under /proc", doc: edit(func(d M) { mountAt(d, 0)["destination"] = "/proc/sys/kernel" }), field: "spec.mounts[0].destination", msg: "/proc"},
		{name: "destination /sys", doc: edit(func(d M) { mountAt(d, 1)["destination"] = "/sys" }), field: "spec.mounts[1].destination", msg: "/sys"},
		{name: "destination under /sys", doc: edit(func(d M) { mountAt(d, 1)["destination"] = "/sys/fs/cgroup" }), field: "spec.mounts[1].destination", msg: "/sys"},
		{name: "destination /dev", doc: edit(func(d M) { mountAt(d, 0)["destination"] = "/dev" }), field: "spec.mounts[0].destination", msg: "/dev"},
		{name: "destination under /dev", doc: edit(func(d M) { mountAt(d, 1)["destination"] = "/dev/shm" }), field: "spec.mounts[1].destination", msg: "/dev"},
		{name: "duplicate destinations", doc: edit(setMounts(tmpfsM("/data"), bindM("/srv", "/data"))), field: "spec.mounts[1].destination", msg: "already mounted"},
		{name: "inside an earlier bind", doc: edit(setMounts(bindM("/srv/data", "/data"), tmpfsM("/data/tmp"))), field: "spec.mounts[1].destination", msg: "inside the bind mount"},
		{name: "deep inside an earlier bind", doc: edit(setMounts(tmpfsM("/x"), bindM("/srv/data", "/data"), bindM("/srv/o", "/data/a/b"))), field: "spec.mounts[2].destination", msg: "inside the bind mount"},
		{name: "later mount hides an earlier one", doc: edit(setMounts(tmpfsM("/data/cache"), bindM("/srv/data", "/data"))), field: "spec.mounts[1].destination", msg: "hide"},
		{name: "too many mounts", doc: edit(setMounts(manyMounts...)), field: "spec.mounts", msg: fmt.Sprint(cellos.MaxMounts)},
		{name: "system path /usr/local without rootfs", doc: edit(both(noRootfs, setMounts(bindM("/opt/tools", "/usr/local")))), field: "spec.mounts[0].destination", msg: "/usr"},
		{name: "system path /usr without rootfs", doc: edit(both(noRootfs, setMounts(tmpfsM("/data"), tmpfsM("/usr")))), field: "spec.mounts[1].destination", msg: "/usr"},
		{name: "system path /lib64 without rootfs", doc: edit(both(noRootfs, setMounts(tmpfsM("/lib64")))), field: "spec.mounts[0].destination"},
		{name: "system path /bin/x without rootfs", doc: edit(both(noRootfs, setMounts(tmpfsM("/bin/x")))), field: "spec.mounts[0].destination"},
		{name: "/etc hides alternatives without rootfs", doc: edit(both(noRootfs, setMounts(tmpfsM("/etc")))), field: "spec.mounts[0].destination", msg: "/etc/alternatives"},
		{name: "loader cache without rootfs", doc: edit(both(noRootfs, setMounts(tmpfsM("/etc/ld.so.cache")))), field: "spec.mounts[0].destination"},

		// resources.
		{name: "memory below minimum", doc: edit(func(d M) { obj(d, "spec", "resources")["memoryBytes"] = cellos.MinMemoryBytes - 1 }), field: "spec.resources.memoryBytes", msg: fmt.Sprint(cellos.MinMemoryBytes)},
		{name: "memory one byte", doc: edit(func(d M) { obj(d, "spec", "resources")["memoryBytes"] = 1 }), field: "spec.resources.memoryBytes"},
		{name: "memory negative", doc: edit(func(d M) { obj(d, "spec", "resources")["memoryBytes"] = -1 }), field: "spec.resources.memoryBytes"},
		{name: "cpu below minimum", doc: edit(func(d M) { obj(d, "spec", "resources")["cpuMillis"] = cellos.MinCPUMillis - 1 }), field: "spec.resources.cpuMillis"},
		{name: "cpu above maximum", doc: edit(func(d M) { obj(d, "spec", "resources")["cpuMillis"] = cellos.MaxCPUMillis + 1 }), field: "spec.resources.cpuMillis"},
		{name: "cpu negative", doc: edit(func(d M) { obj(d, "spec", "resources")["cpuMillis"] = -500 }), field: "spec.resources.cpuMillis"},
		{name: "pids negative", doc: edit(func(d M) { obj(d, "spec", "resources")["pids"] = -1 }), field: "spec.resources.pids"},

		// network.egress.
		{name: "cidr invalid", doc: edit(setEgress(rule("not-a-cidr", 443, "tcp"))), field: "spec.network.egress[0].cidr", msg: "not a CIDR"},
		{name: "cidr without prefix", doc: edit(setEgress(rule("203.0.113.7", 443, "tcp"))), field: "spec.network.egress[0].cidr"},
		{name: "cidr empty", doc: edit(setEgress(rule("", 443, "tcp"))), field: "spec.network.egress[0].cidr"},
		{name: "cidr host bits", doc: edit(setEgress(rule("10.0.0.0/8", 1, "tcp"), rule("203.0.113.7/24", 443, "tcp"))), field: "spec.network.egress[1].cidr", msg: "203.0.113.0/24"},
		{name: "cidr v6 host bits", doc: edit(setEgress(rule("2001:db8::1/32", 443, "tcp"))), field: "spec.network.egress[0].cidr", msg: "2001:db8::/32"},
		{name: "port 0", doc: edit(setEgress(rule("10.0.0.0/8", 0, "tcp"))), field: "spec.network.egress[0].port"},
		{name: "port 65536", doc: edit(setEgress(rule("10.0.0.0/8", 65536, "tcp"))), field: "spec.network.egress[0].port"},
		{name: "port negative", doc: edit(setEgress(rule("10.0.0.0/8", -443, "udp"))), field: "spec.network.egress[0].port"},
		{name: "protocol icmp", doc: edit(setEgress(rule("10.0.0.0/8", 1, "icmp"))), field: "spec.network.egress[0].protocol", msg: "icmp"},
		{name: "protocol upper case", doc: edit(setEgress(rule("10.0.0.0/8", 1, "TCP"))), field: "spec.network.egress[0].protocol"},
		{name: "protocol missing", doc: edit(setEgress(M{"cidr": "10.0.0.0/8", "port": 1})), field: "spec.network.egress[0].protocol"},
		{name: "too many egress rules", doc: edit(setEgress(manyRules...)), field: "spec.network.egress", msg: fmt.Sprint(cellos.MaxEgressRules)},

		// lifetime.
		{name: "ttl negative", doc: edit(setSpec("lifetime", M{"ttlSeconds": -1})), field: "spec.lifetime.ttlSeconds"},
		{name: "ttl too large", doc: edit(setSpec("lifetime", M{"ttlSeconds": cellos.MaxTTLSeconds + 1})), field: "spec.lifetime.ttlSeconds", msg: fmt.Sprint(cellos.MaxTTLSeconds)},

		// labels.
		{name: "label key leading dash", doc: edit(setSpec("labels", M{"-team": "ci"})), field: "spec.labels", msg: "-team"},
		{name: "label key trailing dot", doc: edit(setSpec("labels", M{"team.": "ci"})), field: "spec.labels"},
		{name: "label key slash", doc: edit(setSpec("labels", M{"a/b": "ci"})), field: "spec.labels"},
		{name: "label key empty", doc: edit(setSpec("labels", M{"": "ci"})), field: "spec.labels"},
		{name: "label key 64 chars", doc: edit(setSpec("labels", M{long('k', 64): "ci"})), field: "spec.labels"},
		{name: "label key unicode", doc: edit(setSpec("labels", M{"équipe": "ci"})), field: "spec.labels"},
		{name: "label value too long", doc: edit(setSpec("labels", M{"team": long('v', cellos.MaxLabelValue+1)})), field: "spec.labels.team", msg: fmt.Sprint(cellos.MaxLabelValue)},
		{name: "label value NUL", doc: edit(setSpec("labels", M{"team": "c\x00i"})), field: "spec.labels.team", msg: "NUL"},
		{name: "too many labels", doc: edit(setSpec("labels", manyLabels)), field: "spec.labels", msg: fmt.Sprint(cellos.MaxLabels)},
	}
}

func TestParseDocumentInvalid(t *testing.T) {
	for _, tc := range badCases() {
		t.Run(tc.name, func(t *testing.T) {
			doc, err := cellos.ParseDocument([]byte(tc.doc))
			require.Nil(t, doc)
			e := requireInvalidSpec(t, err)
			assert.Equal(t, "parse", e.Op)
			assertBad(t, tc, err)
		})
	}
}

// TestValidateInvalid runs the cases a Go-built document can have through Validate alone, as
// Create does: Validate must find them without the help of ParseDocument.
func TestValidateInvalid(t *testing.T) {
	for _, tc := range badCases() {
		if tc.shape {
			continue
		}
		t.Run(tc.name, func(t *testing.T) {
			var doc cellos.ExecutionCellDocument
			require.NoError(t, json.Unmarshal([]byte(tc.doc), &doc)) // lenient: no shape checks
			err := doc.Validate()
			e := requireInvalidSpec(t, err)
			assert.Equal(t, "validate", e.Op)
			assertBad(t, tc, err)
		})
	}
}

func assertBad(t *testing.T, tc badCase, err error) {
	t.Helper()
	msg := err.Error()
	if tc.field == "" {
		assert.Empty(t, cellos.Fields(err), "a whole-document problem names no field")
	} else {
		assert.Contains(t, cellos.Fields(err), tc.field)
		assert.Contains(t, msg, tc.field+":")
	}
	if tc.msg != "" {
		assert.Contains(t, msg, tc.msg)
	}
	if tc.noID {
		assert.Regexp(t, `^(parse|validate): `, msg, "no cell is named")
	} else {
		assert.Contains(t, msg, fmt.Sprintf("cell %q", exampleIDOf(tc.doc)))
	}
	assert.Less(t, len(msg), 64<<10, "the message stays readable")
}

// exampleIDOf is the id the bad documents carry: the example's, or the minimal document's.
func exampleIDOf(doc string) string {
	if strings.Contains(doc, `"id":"a"`) {
		return "a"
	}
	return exampleID
}

func TestValidateListsEveryProblem(t *testing.T) {
	doc := edit(func(d M) {
		d["kind"] = "Pod"
		setRun("argv", []any{})(d)
		setRun("env", M{"1BAD": "x"})(d)
		mountAt(d, 1)["destination"] = "scratch"
		obj(d, "spec", "resources")["memoryBytes"] = 1
		setEgress(rule("10.0.0.1/8", 0, "icmp"))(d)
		setSpec("lifetime", M{"ttlSeconds": -5})(d)
		setSpec("labels", M{"ok": "c\x00i"})(d)
	})
	want := []string{
		"kind",
		"spec.run.argv",
		"spec.run.env",
		"spec.mounts[1].destination",
		"spec.resources.memoryBytes",
		"spec.network.egress[0].cidr",
		"spec.network.egress[0].port",
		"spec.network.egress[0].protocol",
		"spec.lifetime.ttlSeconds",
		"spec.labels.ok",
	}

	_, err := cellos.ParseDocument([]byte(doc))
	requireInvalidSpec(t, err)
	assert.ElementsMatch(t, want, cellos.Fields(err))
	for _, f := range want {
		assert.Contains(t, err.Error(), f+":")
	}
	assert.Contains(t, err.Error(), `cell "build-42"`)

	var d cellos.ExecutionCellDocument
	require.NoError(t, json.Unmarshal([]byte(doc), &d))
	err = d.Validate()
	requireInvalidSpec(t, err)
	assert.ElementsMatch(t, want, cellos.Fields(err))

	var fs cellos.FieldErrors
	require.ErrorAs(t, err, &fs)
	assert.Len(t, fs, len(want))
	for _, f := range fs {
		assert.NotEmpty(t, f.Reason, f.Field)
	}
}

func TestValidateNil(t *testing.T) {
	var doc *cellos.ExecutionCellDocument
	err := doc.Validate()
	e := requireInvalidSpec(t, err)
	assert.Empty(t, e.CellID)
}

func TestValidateGoBuiltDocument(t *testing.T) {
	ro := false
	doc := &cellos.ExecutionCellDocument{
		APIVersion: cellos.APIVersion,
		Kind:       cellos.Kind,
		Spec: cellos.CellSpec{
			ID:     "go-built",
			Run:    cellos.RunSpec{Argv: []string{"/bin/true"}},
			Mounts: []cellos.MountSpec{{Type: cellos.MountBind, Source: "/srv", Destination: "/srv", ReadOnly: &ro}},
		},
	}
	require.NoError(t, doc.Validate())
	assert.False(t, doc.Spec.Mounts[0].IsReadOnly())

	doc.Spec.Mounts = append(doc.Spec.Mounts, cellos.MountSpec{Type: cellos.MountTmpfs, Destination: "/srv/x"})
	err := doc.Validate()
	requireInvalidSpec(t, err)
	assert.Equal(t, []string{"spec.mounts[1].destination"}, cellos.Fields(err))
	assert.Contains(t, err.Error(), `validate cell "go-built"`)
}

// TestValidateHugeListsStayCheap: lists far beyond their limits in a document within
// MaxDocumentBytes must be refused by their count, without a check (and an error) per entry
// or per pair of entries.
func TestValidateHugeListsStayCheap(t *testing.T) {
	const n = 5000
	ms := make([]cellos.MountSpec, n)
	for i := range ms {
		ms[i] = cellos.MountSpec{Type: "tmpfs", Destination: "/same"}
	}
	rules := make([]cellos.EgressRule, 20*n)
	env := map[string]string{}
	labels := map[string]string{}
	for i := range 2 * n {
		env[fmt.Sprintf("%d-bad", i)] = ""
		labels[fmt.Sprintf("-%d", i)] = ""
	}
	doc := &cellos.ExecutionCellDocument{
		APIVersion: cellos.APIVersion,
		Kind:       cellos.Kind,
		Spec: cellos.CellSpec{
			ID:      "huge",
			Run:     cellos.RunSpec{Argv: []string{"/bin/true"}, Env: env},
			Mounts:  ms,
			Network: &cellos.NetworkSpec{Egress: rules},
			Labels:  labels,
		},
	}
	start := time.Now()
	err := doc.Validate()
	took := time.Since(start)
	requireInvalidSpec(t, err)
	assert.ElementsMatch(t, []string{"spec.run.env", "spec.mounts", "spec.network.egress", "spec.labels"}, cellos.Fields(err))
	assert.Less(t, len(err.Error()), 4096)
	assert.Less(t, took, 2*time.Second)

	// The same through ParseDocument, within MaxDocumentBytes.
	raw := editMin(setMounts(func() []M {
		l := make([]M, 20000)
		for i := range l {
			l[i] = tmpfsM("/d")
		}
		return l
	}()...))
	require.Less(t, len(raw), cellos.MaxDocumentBytes)
	_, err = cellos.ParseDocument([]byte(raw))
	requireInvalidSpec(t, err)
	assert.Equal(t, []string{"spec.mounts"}, cellos.Fields(err))
}

func TestParseDocumentOversizedIsRefusedBeforeDecoding(t *testing.T) {
	// Beyond the limit the document is not even checked for syntax.
	data := []byte(`{"spec": {"id": "big-one"}, "x": "` + strings.Repeat("a", cellos.MaxDocumentBytes) + `"`)
	_, err := cellos.ParseDocument(data)
	requireInvalidSpec(t, err)
	assert.Contains(t, err.Error(), fmt.Sprintf("document is %d bytes", len(data)))
	assert.NotContains(t, err.Error(), "malformed")
	assert.Contains(t, err.Error(), `cell "big-one"`)
}

func TestCheckID(t *testing.T) {
	for _, id := range []string{"a", "build-42", strings.Repeat("x", 64), "A_b.c-9"} {
		assert.True(t, cellos.ValidID(id), id)
		assert.NoError(t, cellos.CheckID("wait", id), id)
	}
	for _, id := range []string{"", "-x", ".x", "_x", "a/b", "../x", strings.Repeat("x", 65), "a\x00", "ü", "a\n"} {
		assert.False(t, cellos.ValidID(id), "%q", id)
		err := cellos.CheckID("wait", id)
		e := requireInvalidSpec(t, err)
		assert.Equal(t, "wait", e.Op)
		assert.Empty(t, e.CellID)
		assert.Equal(t, []string{"spec.id"}, cellos.Fields(err))
		assert.True(t, strings.HasPrefix(err.Error(), "wait: "), err.Error())
	}
	// A very long id is shortened in the message.
	err := cellos.CheckID("wait", strings.Repeat("z", 10000))
	assert.Less(t, len(err.Error()), 400)
}

func TestEffectiveEnv(t *testing.T) {
	r := cellos.RunSpec{Env: map[string]string{"LANG": "C.UTF-8", "A1": "x", "A": "y=z", "ZED": ""}}
	assert.Equal(t, []string{"A=y=z", "A1=x", "LANG=C.UTF-8", "PATH=" + cellos.DefaultPath, "ZED="}, r.EffectiveEnv(),
		"sorted by key, PATH defaulted")

	r = cellos.RunSpec{Env: map[string]string{"PATH": "/opt/bin", "HOME": "/home"}}
	assert.Equal(t, []string{"HOME=/home", "PATH=/opt/bin"}, r.EffectiveEnv(), "an explicit PATH wins, no second PATH")

	r = cellos.RunSpec{Env: map[string]string{"PATH": ""}}
	assert.Equal(t, []string{"PATH="}, r.EffectiveEnv(), "an explicitly empty PATH is kept")

	assert.Equal(t, []string{"PATH=" + cellos.DefaultPath}, (&cellos.RunSpec{}).EffectiveEnv())
}

func TestEffectiveDefaults(t *testing.T) {
	r := cellos.RunSpec{}
	assert.Equal(t, cellos.UserSpec{UID: cellos.DefaultUID, GID: cellos.DefaultGID}, r.EffectiveUser())
	assert.NotZero(t, r.EffectiveUser().UID, "the default user is not root")
	assert.Equal(t, "/", r.EffectiveWorkingDir())

	r = cellos.RunSpec{User: &cellos.UserSpec{UID: 0, GID: 10}, WorkingDir: "/w"}
	assert.Equal(t, cellos.UserSpec{UID: 0, GID: 10}, r.EffectiveUser())
	assert.Equal(t, "/w", r.EffectiveWorkingDir())

	var s cellos.CellSpec
	assert.Equal(t, int64(0), s.TTLSeconds())
	assert.False(t, s.WantsCgroups())
	s.Lifetime = &cellos.LifetimeSpec{TTLSeconds: 9}
	assert.Equal(t, int64(9), s.TTLSeconds())
	s.Resources = &cellos.ResourceSpec{}
	assert.False(t, s.WantsCgroups())
	s.Resources = &cellos.ResourceSpec{Pids: 5}
	assert.False(t, s.WantsCgroups(), "pids alone asks for no memory/cpu cgroup")
	s.Resources = &cellos.ResourceSpec{CPUMillis: 100}
	assert.True(t, s.WantsCgroups())
	s.Resources = &cellos.ResourceSpec{MemoryBytes: cellos.MinMemoryBytes}
	assert.True(t, s.WantsCgroups())

	f := false
	tr := true
	assert.True(t, cellos.MountSpec{Type: cellos.MountBind}.IsReadOnly(), "bind mounts default to read-only")
	assert.False(t, cellos.MountSpec{Type: cellos.MountBind, ReadOnly: &f}.IsReadOnly())
	assert.False(t, cellos.MountSpec{Type: cellos.MountTmpfs}.IsReadOnly(), "tmpfs mounts default to writable")
	assert.True(t, cellos.MountSpec{Type: cellos.MountTmpfs, ReadOnly: &tr}.IsReadOnly())
}

func TestPortJSONNames(t *testing.T) {
	s := "x"
	b := true
	h, err := json.Marshal(cellos.CellHandle{CellID: "c", CgroupPath: &s, NftRulesApplied: &b, KernelDigestSHA256: &s, RootfsDigestSHA256: &s})
	require.NoError(t, err)
	assert.JSONEq(t, `{"cellId":"c","cgroupPath":"x","nftRulesApplied":true,"kernelDigestSha256":"x","rootfsDigestSha256":"x","firecrackerDigestSha256":null}`, string(h))

	r, err := json.Marshal(cellos.TeardownReport{CellID: "c", Destroyed: true, PeersTrackedAfter: 2})
	require.NoError(t, err)
	assert.JSONEq(t, `{"cellId":"c","destroyed":true,"peersTrackedAfter":2}`, string(r))

	x, err := json.Marshal(cellos.ExitStatus{Code: 137, Signal: 9, Reason: cellos.ExitSignaled})
	require.NoError(t, err)
	assert.JSONEq(t, `{"code":137,"signal":9,"reason":"signaled"}`, string(x))

	for reason, want := range map[cellos.ExitReason]string{
		cellos.ExitExited: "exited", cellos.ExitSignaled: "signaled", cellos.ExitDeadlineExceeded: "deadline-exceeded",
		cellos.ExitOOMKilled: "oom-killed", cellos.ExitDestroyed: "destroyed",
	} {
		assert.Equal(t, want, string(reason))
	}
}

func TestKindsAreDistinct(t *testing.T) {
	kinds := append([]error{cellos.ErrInvalidSpec}, otherKinds...)
	for i, a := range kinds {
		for j, b := range kinds {
			assert.Equal(t, i == j, errors.Is(a, b), "%v vs %v", a, b)
		}
	}
}
