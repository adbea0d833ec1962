package cellos_test

import (
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// checkFastMatchesSlow holds ParseDocument's fast path to the slow one (checkShape, then
// encoding/json): both accept the same inputs and decode them to the same document, and
// ParseDocument answers exactly as the slow path alone does, errors word for word.
func checkFastMatchesSlow(t testing.TB, data []byte) {
	t.Helper()
	fast, ok := cellos.DecodeStrict(data)
	slow, slowErr := cellos.DecodeSlow(data)
	require.Equal(t, slowErr == nil, ok, "fast path ok=%v, slow path error %v, for %q", ok, slowErr, data)
	if ok {
		require.Equal(t, slow, fast, "decoded differently: %q", data)
	}
	if len(data) > cellos.MaxDocumentBytes {
		return // refused by its size before either path runs
	}
	doc, err := cellos.ParseDocument(data)
	want, wantErr := cellos.ParseSlow(data)
	if wantErr != nil {
		require.EqualError(t, err, wantErr.Error(), "for %q", data)
		require.Equal(t, cellos.Fields(wantErr), cellos.Fields(err))
		require.Nil(t, doc)
		return
	}
	require.NoError(t, err, "for %q", data)
	require.Equal(t, want, doc)
}

// edgeDocuments vary the example at each kind of value with the literals a decoder gets wrong:
// numbers at and beyond the limits of their types, escapes, nulls, wrong types, broken syntax.
func edgeDocuments() []string {
	values := map[string][]string{
		`65534`: {`0`, `-0`, `1`, `-1`, `4294967295`, `4294967296`, `1.0`, `1e2`, `01`, `00`, `-`, `+1`, `1.`, `.5`,
			`18446744073709551615`, `18446744073709551616`, `99999999999999999999`, `null`, `"1"`, `true`, `[]`, `{}`},
		`268435456`: {`0`, `-0`, `-1`, `9223372036854775807`, `9223372036854775808`, `-9223372036854775808`,
			`-9223372036854775809`, `1E9`, `2.5e8`, `268435456.0`, `0x10`, `null`, `nul`, `nullx`, `"268435456"`, `[1]`},
		`"C.UTF-8"`: {`""`, `null`, `"\u0000"`, `"\ud800"`, `"\udc00\ud800"`, `"\ud83d\ude00"`, `"\ud83d\u0041"`, `"\ud83d"`,
			`"\u00e9\u00E9"`, `"\x"`, `"\u12"`, `"\u12G4"`, `"\'"`, `"a` + "\t" + `b"`, `"a` + "\x7f\xc3\xa9\xff\xc3" + `"`, `"\/\\\"\b\f\n\r\t"`,
			`"unterminated`, `1`, `true`, `{}`, `[]`},
		`false`:     {`true`, `null`, `tru`, `false1`, `0`, `"false"`, `f`},
		`true`:      {`false`, `null`, `1`, `"true"`, `nulll`, `[]`},
		`"/bin/sh"`: {`null`, `""`, `1`, `["x"]`, `"\u002fbin/sh"`},
		`[]`:        {`null`, `[null]`, `[{}]`, `[{"cidr":"10.0.0.0/8","port":1,"protocol":"udp"}]`, `[1]`, `{}`, `[,]`, `[{},]`, `[ ]`},
		`{"team": "ci"}`: {`null`, `{}`, `{"a":null}`, `{"a":"b","a":"c"}`, `{"a":"b","\u0061":"c"}`, `{"":""}`, `[]`,
			`{"a" "b"}`, `{"a":}`, `{,}`, `{"a":"b",}`, `{"\ud800":"x","\udfff":"y"}`, `{"\ufffd":"x","\ud800":"y"}`},
		`"spec"`:       {`"Spec"`, `"spec "`, `"\u0073pec"`, `"sp\u0065c"`},
		`"mounts"`:     {`"Mounts"`, `"mounts\u0000"`},
		`"readOnly"`:   {`"readonly"`, `"\u0072eadOnly"`},
		`"user"`:       {`"User"`, `"users"`},
		`"uid"`:        {`"UID"`, `"gid"`, `"\u0075id"`},
		`"ttlSeconds"`: {`"ttl"`, `"TTLSeconds"`},
	}
	var docs []string
	for old, news := range values {
		for _, n := range news {
			docs = append(docs, strings.Replace(exampleDoc, old, n, 1))
		}
	}
	return append(docs,
		``, ` `, `null`, ` null `, `nul`, `nullnull`, `{}`, `[]`, `1`, `"x"`, `{`, `}`, `{"apiVersion"}`, `{"apiVersion":}`,
		`{"apiVersion":"cellos.dev/v1",}`, `{,}`, `{} {}`, `{}x`, "\ufeff{}", `{"spec":{"run":null}}`, `{"spec":null}`,
		`{"spec":{"run":{"argv":[null]}}}`, `{"spec":{"run":{"user":{"uid":1,"gid":2,"gid":3}}}}`,
		`{"spec":{"run":{"user":{"uid":null,"gid":null}}}}`, `{"spec":{"run":{"user":null}}}`,
		`{"spec":{"mounts":[null,{"readOnly":null},{"readOnly":false}]}}`, `{"spec":{"network":{"egress":[null]}}}`,
		`{"spec":{"network":{"egress":[{"port":9223372036854775807}]}}}`, `{"spec":{"network":{"egress":[{"port":-0}]}}}`,
		exampleDoc+"\x00", "\x00"+exampleDoc, exampleDoc[:len(exampleDoc)-1],
	)
}

func TestFastPathMatchesSlowPath(t *testing.T) {
	var docs []string
	for _, c := range validCases() {
		docs = append(docs, c.doc)
	}
	for _, c := range badCases() {
		docs = append(docs, c.doc)
	}
	for _, s := range fuzzSeeds() {
		docs = append(docs, s.doc)
	}
	docs = append(docs, edgeDocuments()...)
	for _, d := range docs {
		checkFastMatchesSlow(t, []byte(d))
	}
}

// TestFastPathTakesValidDocuments: the documents a supervisor sends never need the slow path.
func TestFastPathTakesValidDocuments(t *testing.T) {
	for _, c := range validCases() {
		_, ok := cellos.DecodeStrict([]byte(c.doc))
		assert.True(t, ok, c.name)
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
