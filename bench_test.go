package gvisor

import (
	"os"
	"testing"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// typicalDocument is the cell document format's example (testdata/documents/design-example.json):
// a realistic document with every section filled in. Read when a benchmark asks, not at init:
// the test binary also runs as shims, whose working directory is not the package's.
func typicalDocument(tb testing.TB) []byte {
	tb.Helper()
	data, err := os.ReadFile("testdata/documents/design-example.json")
	if err != nil {
		tb.Fatal(err)
	}
	return data
}

func BenchmarkParseDocument(b *testing.B) {
	data := typicalDocument(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := cellos.ParseDocument(data); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkValidate(b *testing.B) {
	doc, err := cellos.ParseDocument(typicalDocument(b))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := doc.Validate(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkGenerateConfig(b *testing.B) {
	doc, err := cellos.ParseDocument(typicalDocument(b))
	if err != nil {
		b.Fatal(err)
	}
	in := SpecInputs{HostSystem: ProbeHostSystem(), CgroupsPath: "/cellos/build-42"}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := MarshalSpec(BuildSpec(doc, in)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParseValidateGenerate is the whole document path of Create: bytes in, config.json out.
func BenchmarkParseValidateGenerate(b *testing.B) {
	data := typicalDocument(b)
	in := SpecInputs{HostSystem: ProbeHostSystem(), CgroupsPath: "/cellos/build-42"}
	b.ReportAllocs()
	for b.Loop() {
		doc, err := cellos.ParseDocument(data)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := MarshalSpec(BuildSpec(doc, in)); err != nil {
			b.Fatal(err)
		}
	}
}

// TestDocumentPathAllocations holds the document path to its budget of issue 5: at most 100
// allocations to parse, validate and generate the config of a typical document. Allocations are
// counted, not timed, so this holds on a busy machine too.
func TestDocumentPathAllocations(t *testing.T) {
	data := typicalDocument(t)
	in := SpecInputs{HostSystem: ProbeHostSystem(), CgroupsPath: "/cellos/build-42"}
	allocs := testing.AllocsPerRun(200, func() {
		doc, err := cellos.ParseDocument(data)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := MarshalSpec(BuildSpec(doc, in)); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("%.0f allocations", allocs)
	if allocs > 100 {
		t.Errorf("the document path takes %.0f allocations, the budget is 100", allocs)
	}
}
