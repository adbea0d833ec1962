package image

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
)

// LayoutPrefix marks a reference to an OCI image layout on disk: "oci-layout:DIR[:TAG]".
const LayoutPrefix = "oci-layout:"

// Ref is a parsed image reference: a registry's or an OCI layout's.
type Ref struct {
	s         string
	registry  name.Reference // nil for a layout
	layoutDir string
	layoutTag string
}

// ParseRef parses "REGISTRY/REPO:TAG", "REGISTRY/REPO@sha256:HEX" (short names as docker reads
// them: "busybox" is index.docker.io/library/busybox:latest) or "oci-layout:DIR[:TAG]" (DIR
// absolute, TAG default "latest"; the last ':' after DIR splits them).
func ParseRef(s string) (Ref, error) {
	if rest, ok := strings.CutPrefix(s, LayoutPrefix); ok {
		dir, tag := rest, "latest"
		if i := strings.LastIndexByte(rest, ':'); i >= 0 && !strings.Contains(rest[i:], "/") {
			dir, tag = rest[:i], rest[i+1:]
		}
		switch {
		case !filepath.IsAbs(dir):
			return Ref{}, fmt.Errorf("%q: the OCI layout directory %q must be absolute", s, dir)
		case filepath.Clean(dir) != dir:
			return Ref{}, fmt.Errorf("%q: the OCI layout directory %q is not clean", s, dir)
		case tag == "":
			return Ref{}, fmt.Errorf("%q: empty tag", s)
		}
		return Ref{s: s, layoutDir: dir, layoutTag: tag}, nil
	}
	r, err := name.ParseReference(s)
	if err != nil {
		return Ref{}, fmt.Errorf("%q is not an image reference: %w", s, err)
	}
	return Ref{s: s, registry: r}, nil
}

// String is the reference as given.
func (r Ref) String() string { return r.s }

// Layout returns the directory and tag of an OCI layout reference.
func (r Ref) Layout() (dir, tag string, ok bool) {
	return r.layoutDir, r.layoutTag, r.registry == nil && r.layoutDir != ""
}
