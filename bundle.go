package gvisor

import (
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/bundle"
)

// The OCI bundle of a cell: config.json built from the document (BuildSpec, MarshalSpec), its
// root and its files. internal/bundle does the work; these are the names a supervisor uses to
// see what a document becomes without creating anything (see also Backend.Config).

// OCIVersion is the runtime-spec version config.json declares: every field the library writes
// exists in 1.0.2, the version Debian's runsc implements.
const OCIVersion = bundle.OCIVersion

// Annotation keys written into config.json.
const (
	AnnotationCellID      = bundle.AnnotationCellID
	AnnotationLabelPrefix = bundle.AnnotationLabelPrefix
)

// DefaultTmpSize is the size of the /tmp a cell gets when it declares none and has no memory
// limit; with one, /tmp is as large as the limit (its files are the sandbox's memory).
const DefaultTmpSize = bundle.DefaultTmpSize

// HostEntry is one host system path as a cell without rootfs sees it: a directory or file
// bind-mounted read-only, or a symlink recreated inside the cell's root (Debian's /bin -> usr/bin).
type HostEntry = bundle.HostEntry

// SpecInputs is what the config depends on besides the document.
type SpecInputs = bundle.SpecInputs

// ProbeHostSystem lists the system paths of this host that exist (cellos.SystemPaths).
func ProbeHostSystem() []HostEntry { return bundle.ProbeHostSystem() }

// BuildSpec turns a validated document into the OCI runtime config of its bundle. The result is
// deterministic for a given document and inputs, and the caller's own.
func BuildSpec(doc *cellos.ExecutionCellDocument, in SpecInputs) *specs.Spec {
	return bundle.BuildSpec(doc, in)
}

// MarshalSpec renders config.json: encoding/json, indented, newline-terminated, deterministic.
func MarshalSpec(spec *specs.Spec) ([]byte, error) { return bundle.MarshalSpec(spec) }
