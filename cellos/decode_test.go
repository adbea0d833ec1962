package cellos_test

import (
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

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
