package cellos_test

import (
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// literal is the example with one literal replaced (the first occurrence of old), and what
// ParseDocument must answer: the field its error names and a part of its message, or, with
// both empty, that it accepts the document. A whole-document error names no field.
type literal struct{ old, new, field, msg string }

// literals vary the example at each kind of value with the literals a decoder gets wrong:
// numbers at and beyond the limits of their types, escapes, nulls, wrong types, broken syntax.
var literals = []literal{
	// run.user.uid, a uint32 that must be given.
	{`65534`, `0`, "", ""},
	{`65534`, `1`, "", ""},
	{`65534`, `-0`, "spec.run.user.uid", "expected an integer within uint32, got -0"},
	{`65534`, `-1`, "spec.run.user.uid", "expected an integer within uint32, got -1"},
	{`65534`, `4294967295`, "spec.run.user.uid", "4294967295 is not a valid uid"},
	{`65534`, `4294967296`, "spec.run.user.uid", "got 4294967296"},
	{`65534`, `18446744073709551615`, "spec.run.user.uid", "got 18446744073709551615"},
	{`65534`, `18446744073709551616`, "spec.run.user.uid", "got 18446744073709551616"},
	{`65534`, `99999999999999999999`, "spec.run.user.uid", "got 99999999999999999999"},
	{`65534`, `1.0`, "spec.run.user.uid", "got 1.0"},
	{`65534`, `1e2`, "spec.run.user.uid", "got 1e2"},
	{`65534`, `null`, "spec.run.user.uid", "is required when user is given"},
	{`65534`, `"1"`, "spec.run.user.uid", "got a string"},
	{`65534`, `true`, "spec.run.user.uid", "got true"},
	{`65534`, `[]`, "spec.run.user.uid", "got an array"},
	{`65534`, `{}`, "spec.run.user.uid", "got an object"},
	{`65534`, `01`, "", "malformed JSON"},
	{`65534`, `00`, "", "malformed JSON"},
	{`65534`, `-`, "", "malformed JSON"},
	{`65534`, `+1`, "", "malformed JSON"},
	{`65534`, `1.`, "", "malformed JSON"},
	{`65534`, `.5`, "", "malformed JSON"},
	// resources.memoryBytes, an int64.
	{`268435456`, `0`, "", ""},
	{`268435456`, `-0`, "", ""},
	{`268435456`, `null`, "", ""},
	{`268435456`, `9223372036854775807`, "", ""},
	{`268435456`, `-1`, "spec.resources.memoryBytes", "is below the minimum"},
	{`268435456`, `-9223372036854775808`, "spec.resources.memoryBytes", "is below the minimum"},
	{`268435456`, `9223372036854775808`, "spec.resources.memoryBytes", "expected an integer within int64, got 9223372036854775808"},
	{`268435456`, `-9223372036854775809`, "spec.resources.memoryBytes", "got -9223372036854775809"},
	{`268435456`, `1E9`, "spec.resources.memoryBytes", "got 1E9"},
	{`268435456`, `2.5e8`, "spec.resources.memoryBytes", "got 2.5e8"},
	{`268435456`, `268435456.0`, "spec.resources.memoryBytes", "got 268435456.0"},
	{`268435456`, `"268435456"`, "spec.resources.memoryBytes", "got a string"},
	{`268435456`, `[1]`, "spec.resources.memoryBytes", "got an array"},
	{`268435456`, `0x10`, "", "malformed JSON"},
	{`268435456`, `nul`, "", "malformed JSON"},
	{`268435456`, `nullx`, "", "malformed JSON"},
	// run.env.LANG, a string. Lone surrogates and invalid UTF-8 become U+FFFD, as in encoding/json.
	{`"C.UTF-8"`, `""`, "", ""},
	{`"C.UTF-8"`, `null`, "", ""},
	{`"C.UTF-8"`, `"\ud800"`, "", ""},
	{`"C.UTF-8"`, `"\udc00\ud800"`, "", ""},
	{`"C.UTF-8"`, `"\ud83d\ude00"`, "", ""},
	{`"C.UTF-8"`, `"\ud83d\u0041"`, "", ""},
	{`"C.UTF-8"`, `"\ud83d"`, "", ""},
	{`"C.UTF-8"`, `"\u00e9\u00E9"`, "", ""},
	{`"C.UTF-8"`, `"a` + "\x7f\xc3\xa9\xff\xc3" + `"`, "", ""},
	{`"C.UTF-8"`, `"\/\\\"\b\f\n\r\t"`, "", ""},
	{`"C.UTF-8"`, `"\u0000"`, "spec.run.env.LANG", "contains a NUL byte"},
	{`"C.UTF-8"`, `1`, "spec.run.env.LANG", "expected a string, got a number"},
	{`"C.UTF-8"`, `true`, "spec.run.env.LANG", "expected a string, got true"},
	{`"C.UTF-8"`, `{}`, "spec.run.env.LANG", "expected a string, got an object"},
	{`"C.UTF-8"`, `[]`, "spec.run.env.LANG", "expected a string, got an array"},
	{`"C.UTF-8"`, `"\x"`, "", "malformed JSON"},
	{`"C.UTF-8"`, `"\u12"`, "", "malformed JSON"},
	{`"C.UTF-8"`, `"\u12G4"`, "", "malformed JSON"},
	{`"C.UTF-8"`, `"\'"`, "", "malformed JSON"},
	{`"C.UTF-8"`, `"a` + "\t" + `b"`, "", "malformed JSON"},
	{`"C.UTF-8"`, `"unterminated`, "", "malformed JSON"},
	// rootfs.writable and mounts[0].readOnly, a bool and a *bool.
	{`false`, `true`, "", ""},
	{`false`, `null`, "", ""},
	{`false`, `0`, "spec.rootfs.writable", "expected true or false, got a number"},
	{`false`, `"false"`, "spec.rootfs.writable", "got a string"},
	{`false`, `tru`, "", "malformed JSON"},
	{`false`, `false1`, "", "malformed JSON"},
	{`false`, `f`, "", "malformed JSON"},
	{`true`, `false`, "", ""},
	{`true`, `null`, "", ""},
	{`true`, `1`, "spec.mounts[0].readOnly", "got a number"},
	{`true`, `"true"`, "spec.mounts[0].readOnly", "got a string"},
	{`true`, `[]`, "spec.mounts[0].readOnly", "got an array"},
	{`true`, `nulll`, "", "malformed JSON"},
	// run.argv[0], a list element.
	{`"/bin/sh"`, `"\u002fbin/sh"`, "", ""},
	{`"/bin/sh"`, `null`, "spec.run.argv[0]", "must not be empty"},
	{`"/bin/sh"`, `""`, "spec.run.argv[0]", "must not be empty"},
	{`"/bin/sh"`, `1`, "spec.run.argv[0]", "expected a string, got a number"},
	{`"/bin/sh"`, `["x"]`, "spec.run.argv[0]", "expected a string, got an array"},
	// network.egress, a list of objects.
	{`[]`, `null`, "", ""},
	{`[]`, `[ ]`, "", ""},
	{`[]`, `[{"cidr":"10.0.0.0/8","port":1,"protocol":"udp"}]`, "", ""},
	{`[]`, `[null]`, "spec.network.egress[0].cidr", "is not a CIDR"},
	{`[]`, `[{}]`, "spec.network.egress[0].port", "is not a port"},
	{`[]`, `[1]`, "spec.network.egress[0]", "expected an object, got a number"},
	{`[]`, `{}`, "spec.network.egress", "expected an array, got an object"},
	{`[]`, `[,]`, "", "malformed JSON"},
	{`[]`, `[{},]`, "", "malformed JSON"},
	// labels, a map.
	{`{"team": "ci"}`, `null`, "", ""},
	{`{"team": "ci"}`, `{}`, "", ""},
	{`{"team": "ci"}`, `{"a":null}`, "", ""},
	{`{"team": "ci"}`, `{"a":"b","a":"c"}`, "spec.labels.a", "duplicate key"},
	{`{"team": "ci"}`, `{"a":"b","\u0061":"c"}`, "spec.labels.a", "duplicate key"},
	{`{"team": "ci"}`, `{"\ud800":"x","\udfff":"y"}`, "spec.labels.\ufffd", "duplicate key"},
	{`{"team": "ci"}`, `{"\ufffd":"x","\ud800":"y"}`, "spec.labels.\ufffd", "duplicate key"},
	{`{"team": "ci"}`, `{"":""}`, "spec.labels", `key "" must match`},
	{`{"team": "ci"}`, `[]`, "spec.labels", "expected an object, got an array"},
	{`{"team": "ci"}`, `{"a" "b"}`, "", "malformed JSON"},
	{`{"team": "ci"}`, `{"a":}`, "", "malformed JSON"},
	{`{"team": "ci"}`, `{,}`, "", "malformed JSON"},
	{`{"team": "ci"}`, `{"a":"b",}`, "", "malformed JSON"},
	// Names: escapes are resolved, the case must match.
	{`"spec"`, `"\u0073pec"`, "", ""},
	{`"spec"`, `"sp\u0065c"`, "", ""},
	{`"spec"`, `"Spec"`, "Spec", `unknown field (did you mean "spec"?)`},
	{`"spec"`, `"spec "`, "spec ", "unknown field"},
	{`"mounts"`, `"Mounts"`, "spec.Mounts", `unknown field (did you mean "mounts"?)`},
	{`"mounts"`, `"mounts\u0000"`, "spec.mounts\x00", "unknown field"},
	{`"readOnly"`, `"\u0072eadOnly"`, "", ""},
	{`"readOnly"`, `"readonly"`, "spec.mounts[0].readonly", `unknown field (did you mean "readOnly"?)`},
	{`"user"`, `"User"`, "spec.run.User", `unknown field (did you mean "user"?)`},
	{`"user"`, `"users"`, "spec.run.users", "unknown field"},
	{`"uid"`, `"\u0075id"`, "", ""},
	{`"uid"`, `"UID"`, "spec.run.user.UID", `unknown field (did you mean "uid"?)`},
	{`"uid"`, `"gid"`, "spec.run.user.gid", "duplicate key"},
	{`"ttlSeconds"`, `"ttl"`, "spec.lifetime.ttl", "unknown field"},
	{`"ttlSeconds"`, `"TTLSeconds"`, "spec.lifetime.TTLSeconds", `unknown field (did you mean "ttlSeconds"?)`},
}

// wholeDocuments are documents far from the example, and the field their error names or a
// part of the message of a whole-document error.
var wholeDocuments = []struct{ doc, field, msg string }{
	{``, "", "malformed JSON: the document ends early"},
	{` `, "", "malformed JSON: the document ends early"},
	{`nul`, "", "malformed JSON: the document ends early"},
	{`{`, "", "malformed JSON: the document ends early"},
	{`}`, "", "malformed JSON at byte 0"},
	{"\ufeff{}", "", "malformed JSON at byte 0"},
	{`{"apiVersion"}`, "", "malformed JSON at byte 13"},
	{`{"apiVersion":}`, "", "malformed JSON at byte 14"},
	{`{"apiVersion":"cellos.dev/v1",}`, "", "malformed JSON at byte 29"},
	{`{,}`, "", "malformed JSON at byte 1"},
	{`nullnull`, "", "trailing data after the document"},
	{`{} {}`, "", "trailing data after the document"},
	{`{}x`, "", "trailing data after the document"},
	{`[]`, "(document)", "expected an object, got an array"},
	{`1`, "(document)", "expected an object, got a number"},
	{`"x"`, "(document)", "expected an object, got a string"},
	{`null`, "apiVersion", `must be "cellos.dev/v1", got ""`},
	{` null `, "spec.run.argv", "is required"},
	{`{}`, "spec.id", "must match"},
	{`{"spec":null}`, "spec.run.argv", "is required"},
	{`{"spec":{"run":null}}`, "spec.run.argv", "is required"},
	{`{"spec":{"run":{"user":null}}}`, "spec.run.argv", "is required"},
	{`{"spec":{"run":{"argv":[null]}}}`, "spec.run.argv[0]", "must not be empty"},
	{`{"spec":{"run":{"user":{"uid":1,"gid":2,"gid":3}}}}`, "spec.run.user.gid", "duplicate key"},
	{`{"spec":{"run":{"user":{"uid":null,"gid":null}}}}`, "spec.run.user.uid", "is required when user is given"},
	{`{"spec":{"mounts":[null,{"readOnly":null},{"readOnly":false}]}}`, "spec.mounts[2].destination", "is required"},
	{`{"spec":{"network":{"egress":[null]}}}`, "spec.network.egress[0].protocol", "must be"},
	{`{"spec":{"network":{"egress":[{"port":9223372036854775807}]}}}`, "spec.network.egress[0].port", "9223372036854775807 is not a port"},
	{`{"spec":{"network":{"egress":[{"port":-0}]}}}`, "spec.network.egress[0].port", "0 is not a port"},
	{exampleDoc + "\x00", "", "trailing data after the document"},
	{"\x00" + exampleDoc, "", "malformed JSON at byte 0"},
	{exampleDoc[:len(exampleDoc)-1], "", "malformed JSON: the document ends early"},
}

// edgeDocuments are the documents of literals and wholeDocuments.
func edgeDocuments() []string {
	var docs []string
	for _, l := range literals {
		docs = append(docs, l.doc())
	}
	for _, w := range wholeDocuments {
		docs = append(docs, w.doc)
	}
	return docs
}

func (l literal) doc() string { return strings.Replace(exampleDoc, l.old, l.new, 1) }

// TestParseDocumentLiterals holds ParseDocument to the rules at each literal and document.
func TestParseDocumentLiterals(t *testing.T) {
	check := func(doc, field, msg string) {
		t.Helper()
		got, err := cellos.ParseDocument([]byte(doc))
		if field == "" && msg == "" {
			require.NoError(t, err, "%q", doc)
			checkAccepted(t, got)
			return
		}
		require.Nil(t, got)
		requireInvalidSpec(t, err)
		if field == "" {
			assert.Empty(t, cellos.Fields(err), "%q: a whole-document problem names no field", doc)
		} else {
			assert.Contains(t, cellos.Fields(err), field, "%q", doc)
			assert.Contains(t, err.Error(), field+": ", "%q", doc)
		}
		assert.Contains(t, err.Error(), msg, "%q", doc)
	}
	for _, l := range literals {
		require.Contains(t, exampleDoc, l.old)
		check(l.doc(), l.field, l.msg)
	}
	for _, w := range wholeDocuments {
		check(w.doc, w.field, w.msg)
	}
}

func TestParseDocumentUserNeedsBothIDs(t *testing.T) {
	const both = "spec.run.user.uid: is required when user is given; spec.run.user.gid: is required when user is given"
	cases := []struct {
		name   string
		user   string
		fields []string
		msg    string
	}{
		{"gid missing", `{"uid": 1000}`, []string{"spec.run.user.gid"}, "spec.run.user.gid: is required when user is given"},
		{"uid missing", `{"gid": 1000}`, []string{"spec.run.user.uid"}, "spec.run.user.uid: is required when user is given"},
		{"both missing", `{}`, []string{"spec.run.user.uid", "spec.run.user.gid"}, both},
		{"gid null", `{"uid": 1000, "gid": null}`, []string{"spec.run.user.gid"}, "spec.run.user.gid: is required when user is given"},
		{"both null", `{"uid": null, "gid": null}`, []string{"spec.run.user.uid", "spec.run.user.gid"}, both},
		{"root uid without gid", `{"uid": 0}`, []string{"spec.run.user.gid"}, "spec.run.user.gid: is required when user is given"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			data := `{"apiVersion":"cellos.dev/v1","kind":"ExecutionCell","spec":{"id":"u1","run":{"argv":["/bin/id"],"user":` + tc.user + `}}}`
			doc, err := cellos.ParseDocument([]byte(data))
			require.Nil(t, doc)
			e := requireInvalidSpec(t, err)
			assert.Equal(t, "parse", e.Op)
			assert.Equal(t, tc.fields, cellos.Fields(err))
			assert.Equal(t, `parse cell "u1": invalid cell spec: `+tc.msg, err.Error())
		})
	}
	t.Run("accepted", func(t *testing.T) {
		for _, user := range []string{`{"uid": 1000, "gid": 1000}`, `{"gid": 0, "uid": 0}`, `{"uid": 1, "\u0067id": 2}`, `null`} {
			data := `{"apiVersion":"cellos.dev/v1","kind":"ExecutionCell","spec":{"id":"u1","run":{"argv":["/bin/id"],"user":` + user + `}}}`
			_, err := cellos.ParseDocument([]byte(data))
			assert.NoError(t, err, user)
		}
	})
	t.Run("a Go-built document", func(t *testing.T) {
		// Validate cannot tell a gid of 0 from a gid left out: the rule is the parser's.
		doc := &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
			Spec: cellos.CellSpec{ID: "u1", Run: cellos.RunSpec{Argv: []string{"/bin/id"}, User: &cellos.UserSpec{UID: 1000}}}}
		assert.NoError(t, doc.Validate())
	})
}

// TestMatchersAgreeWithPatterns holds the hand-written matchers to the patterns messages quote.
func TestMatchersAgreeWithPatterns(t *testing.T) {
	check := func(s string) {
		t.Helper()
		require.Equal(t, cellos.IDPattern.MatchString(s), cellos.ValidID(s), "id %q", s)
		require.Equal(t, cellos.EnvKeyPattern.MatchString(s), cellos.ValidEnvKey(s), "env key %q", s)
		require.Equal(t, cellos.LabelKeyPattern.MatchString(s), cellos.ValidLabelKey(s), "label key %q", s)
	}
	check("")
	for a := range 256 {
		check(string([]byte{byte(a)}))
		for b := range 256 {
			check(string([]byte{byte(a), byte(b)}))
		}
	}
	// Around the length limits, with every kind of byte at the first, an inner and the last place.
	special := []byte("aZ09_.-/ \n\x00\x7f\xc3\xff")
	for n := 60; n <= 66; n++ {
		for _, c := range special {
			for _, at := range []int{0, n / 2, n - 1} {
				b := []byte(strings.Repeat("a", n))
				b[at] = c
				check(string(b))
			}
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	alphabet := []byte("aZ9_.-/\n\x00é")
	for range 20000 {
		b := make([]byte, rng.IntN(70))
		for i := range b {
			b[i] = alphabet[rng.IntN(len(alphabet))]
		}
		check(string(b))
	}
}

// TestValidateAllocatesNothing: a valid document is checked without formatting anything.
func TestValidateAllocatesNothing(t *testing.T) {
	for _, data := range []string{exampleDoc, exampleWithEgress, minimalDoc,
		edit(both(noRootfs, setMounts(bindM("/srv/a", "/data"), tmpfsM("/scratch"), tmpfsM("/scratch/x"))))} {
		doc, err := cellos.ParseDocument([]byte(data))
		require.NoError(t, err)
		assert.Zero(t, testing.AllocsPerRun(100, func() { _ = doc.Validate() }), "%s", data)
	}
}

// TestParseDocumentAllocations bounds what parsing the example costs: what the document holds,
// and nothing for the strict checks.
func TestParseDocumentAllocations(t *testing.T) {
	data := []byte(exampleDoc)
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := cellos.ParseDocument(data); err != nil {
			panic(err)
		}
	})
	t.Logf("%v allocations", allocs)
	assert.LessOrEqual(t, allocs, 30.0)
}

// TestParseDocumentConcurrent: documents parsed at the same time do not share their decoding.
func TestParseDocumentConcurrent(t *testing.T) {
	want, err := cellos.ParseDocument([]byte(exampleDoc))
	require.NoError(t, err)
	bad := []byte(replaced(`"memoryBytes"`, `"MemoryBytes"`))
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 200 {
				doc, err := cellos.ParseDocument([]byte(exampleDoc))
				assert.NoError(t, err)
				assert.Equal(t, want, doc)
				_, err = cellos.ParseDocument(bad)
				assert.Equal(t, []string{"spec.resources.MemoryBytes"}, cellos.Fields(err))
			}
		})
	}
	wg.Wait()
}

// BenchmarkParseDocument is the parse and validation of the example, a typical document.
func BenchmarkParseDocument(b *testing.B) {
	data := []byte(exampleDoc)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := cellos.ParseDocument(data); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParseDocumentRefused is the refusal of the example with a key in the wrong case.
func BenchmarkParseDocumentRefused(b *testing.B) {
	data := []byte(replaced(`"memoryBytes"`, `"MemoryBytes"`))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := cellos.ParseDocument(data); err == nil {
			b.Fatal("accepted")
		}
	}
}
