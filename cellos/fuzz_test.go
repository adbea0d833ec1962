package cellos_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// fuzzIDPattern is the id grammar of the cell document format, written out independently of the package's own.
var fuzzIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

type fuzzSeed struct {
	name  string // the file under testdata/fuzz/FuzzParseDocument
	doc   string
	valid bool
}

// fuzzSeeds are valid and broken documents; the same seeds are kept as files under
// testdata/fuzz/FuzzParseDocument (TestFuzzSeedFiles checks that they are in step).
func fuzzSeeds() []fuzzSeed {
	return []fuzzSeed{
		{"seed-example", exampleDoc, true},
		{"seed-example-egress", exampleWithEgress, true},
		{"seed-minimal", minimalDoc, true},
		{"seed-null-sections", editMin(func(d M) {
			s := obj(d, "spec")
			for _, k := range []string{"rootfs", "mounts", "resources", "network", "lifetime", "labels"} {
				s[k] = nil
			}
		}), true},
		{"seed-no-rootfs", edit(both(noRootfs, setMounts(bindM("/srv/a", "/data"), tmpfsM("/scratch"), tmpfsM("/scratch/x")))), true},
		{"seed-egress-v6", edit(setEgress(rule("2001:db8::/32", 53, "udp"), rule("0.0.0.0/0", 443, "tcp"))), true},
		{"seed-empty-lists", edit(both(setRun("env", M{"PATH": "/bin", "A1": "x", "A": ""}), setRun("workingDir", "/work"),
			setSpec("mounts", []any{}), setSpec("labels", M{}))), true},
		{"seed-wrong-case", replaced(`"memoryBytes"`, `"MemoryBytes"`), false},
		{"seed-duplicate-key", replaced(`"cpuMillis": 500`, `"cpuMillis": 500, "cpuMillis": 0`), false},
		{"seed-trailing-data", exampleDoc + "{}", false},
		{"seed-truncated", exampleDoc[:len(exampleDoc)/2], false},
		{"seed-hidden-mount", edit(setMounts(tmpfsM("/data/cache"), bindM("/srv/data", "/data"))), false},
		{"seed-bad-id", edit(setSpec("id", "../x")), false},
		{"seed-nested-argv", `{"apiVersion":"cellos.dev/v1","kind":"ExecutionCell","spec":{"id":"a","run":{"argv":[[[[[[]]]]]]}}}`, false},
		{"seed-nested-label", `{"spec":{"labels":{"a":{"b":1}},"id":"x"}}`, false},
		{"seed-empty", "", false},
		{"seed-null", "null", false},
		{"seed-array", "[]", false},
		{"seed-escapes", replaced(`"echo hello"`, `"\u0065cho \"h\u00e9llo\" \ud83d\ude00 \ud800 \/"`), true},
		{"seed-escaped-duplicate", replaced(`"id": "build-42",`, `"id": "build-42", "\u0069d": "other",`), false},
		{"seed-user-without-gid", editMin(setRun("user", M{"uid": 1000})), false},
	}
}

// seedFile is a seed in the corpus file format of go test.
func seedFile(doc string) string {
	return "go test fuzz v1\n[]byte(" + strconv.Quote(doc) + ")\n"
}

func FuzzParseDocument(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add([]byte(s.doc))
	}
	f.Fuzz(checkParse)
}

// wholeDocumentReason is how an error that names no field says why the document is refused.
var wholeDocumentReason = regexp.MustCompile(`^parse( cell "[^"]+")?: invalid cell spec: ` +
	`(malformed JSON(: the document ends early| at byte \d+: )|trailing data after the document$|document is \d+ bytes, the limit is \d+$)`)

// checkParse asserts what holds for any input of ParseDocument, which it leaves as it was. A
// refusal is an *Error of kind ErrInvalidSpec alone that names the fields at fault, or says why
// the document as a whole is refused; it names a cell only by a well-formed id. An accepted
// document is valid, is what encoding/json (which is not strict) decodes from the same bytes,
// and parses to itself again once re-encoded.
func checkParse(t *testing.T, data []byte) {
	in := bytes.Clone(data)
	doc, err := cellos.ParseDocument(data)
	require.Equal(t, in, data, "ParseDocument must not modify its input")
	if err != nil {
		require.Nil(t, doc)
		e := requireInvalidSpec(t, err)
		require.Equal(t, "parse", e.Op)
		if e.CellID != "" {
			require.Regexp(t, fuzzIDPattern, e.CellID)
		}
		fields := cellos.Fields(err)
		if len(fields) == 0 {
			require.Regexp(t, wholeDocumentReason, err.Error())
		}
		for _, f := range fields {
			require.Contains(t, err.Error(), f+": ")
		}
		return
	}
	require.NotNil(t, doc)
	checkAccepted(t, doc)

	// Strictness only refuses: it never decodes a document otherwise than encoding/json.
	var lenient cellos.ExecutionCellDocument
	require.NoError(t, json.Unmarshal(data, &lenient))
	require.Equal(t, &lenient, doc)

	// Round trip: what was accepted, marshalled again, parses to the same document.
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	require.NoError(t, enc.Encode(doc))
	var again *cellos.ExecutionCellDocument
	if buf.Len() <= cellos.MaxDocumentBytes {
		again, err = cellos.ParseDocument(buf.Bytes())
		require.NoError(t, err, "re-marshalled: %s", buf.Bytes())
	} else { // escaping grew it past the limit: check the content without the size limit
		again = new(cellos.ExecutionCellDocument)
		require.NoError(t, json.Unmarshal(buf.Bytes(), again))
		require.NoError(t, again.Validate())
	}
	require.Equal(t, normalized(doc), normalized(again))
}

// TestParseDocumentProperties checks the properties of the fuzz target on every document the
// tests know, the seeds' mutations aside.
func TestParseDocumentProperties(t *testing.T) {
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
	for _, d := range append(docs, edgeDocuments()...) {
		checkParse(t, []byte(d))
	}
}

// checkAccepted asserts the invariants of a document ParseDocument accepted.
func checkAccepted(t *testing.T, doc *cellos.ExecutionCellDocument) {
	t.Helper()
	require.NoError(t, doc.Validate())
	require.Equal(t, cellos.APIVersion, doc.APIVersion)
	require.Equal(t, cellos.Kind, doc.Kind)
	require.Regexp(t, fuzzIDPattern, doc.Spec.ID)
	image := doc.Spec.Rootfs != nil && doc.Spec.Rootfs.Image != ""
	if !image || doc.Spec.Run.Argv != nil {
		require.NotEmpty(t, doc.Spec.Run.Argv)
		require.NotEmpty(t, doc.Spec.Run.Argv[0])
	}
	for _, m := range doc.Spec.Mounts {
		require.True(t, path.IsAbs(m.Destination), "mount destination %q", m.Destination)
		require.Equal(t, path.Clean(m.Destination), m.Destination)
		require.NotEqual(t, "/", m.Destination)
		require.Contains(t, []string{cellos.MountBind, cellos.MountTmpfs}, m.Type)
		if m.Type == cellos.MountBind {
			require.True(t, path.IsAbs(m.Source) && path.Clean(m.Source) == m.Source, "bind source %q", m.Source)
		}
	}
	if r := doc.Spec.Rootfs; r != nil && !image {
		require.True(t, path.IsAbs(r.Path) && path.Clean(r.Path) == r.Path && r.Path != "/", "rootfs %q", r.Path)
	} else if image {
		require.Empty(t, r.Path, "path and image are exclusive")
		require.LessOrEqual(t, len(r.Image), cellos.MaxImageRefBytes)
	}
	require.True(t, path.IsAbs(doc.Spec.Run.EffectiveWorkingDir()))
}

// normalized maps the empty lists and maps that omitempty drops to nil.
func normalized(d *cellos.ExecutionCellDocument) cellos.ExecutionCellDocument {
	c := *d
	if len(c.Spec.Mounts) == 0 {
		c.Spec.Mounts = nil
	}
	if len(c.Spec.Labels) == 0 {
		c.Spec.Labels = nil
	}
	if len(c.Spec.Run.Env) == 0 {
		c.Spec.Run.Env = nil
	}
	return c
}

func TestFuzzSeedFiles(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzParseDocument")
	for _, s := range fuzzSeeds() {
		t.Run(s.name, func(t *testing.T) {
			doc, err := cellos.ParseDocument([]byte(s.doc))
			if s.valid {
				require.NoError(t, err)
				checkAccepted(t, doc)
			} else {
				require.ErrorIs(t, err, cellos.ErrInvalidSpec)
			}
			onDisk, err := os.ReadFile(filepath.Join(dir, s.name))
			require.NoError(t, err)
			require.Equal(t, seedFile(s.doc), string(onDisk), "testdata is out of step with fuzzSeeds")
		})
	}
}
