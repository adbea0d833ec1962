package gvisor

import (
	"encoding/json"
	"errors"
	"os"
	"path"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// FuzzBuildSpec feeds documents through ParseDocument and bundle generation: nothing panics, and
// every accepted document yields a config whose root is the bundle's own rootfs, whose mounts are
// exactly the library's fixed ones plus those declared, and whose paths are absolute and clean.
func FuzzBuildSpec(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/cells/*.json")
	for _, s := range seeds {
		if data, err := os.ReadFile(s); err == nil {
			f.Add(data, false)
		}
	}
	for _, s := range []string{
		`{"apiVersion":"cellos.dev/v1","kind":"ExecutionCell","spec":{"id":"a","run":{"argv":["/bin/true"]}}}`,
		`{"apiVersion":"cellos.dev/v1","kind":"ExecutionCell","spec":{"id":"b.c-d_e","run":{"argv":["x"],"env":{"A":"1","PATH":"/x"},"workingDir":"/w","user":{"uid":0,"gid":7}},"rootfs":{"path":"/img","writable":true},"mounts":[{"type":"bind","source":"/s","destination":"/d"},{"type":"tmpfs","destination":"/tmp","sizeBytes":1024,"readOnly":true}],"resources":{"memoryBytes":67108864,"cpuMillis":250},"lifetime":{"ttlSeconds":5},"labels":{"k.v":"w"}}}`,
		`{"apiVersion":"cellos.dev/v1","kind":"ExecutionCell","spec":{"id":"m","run":{"argv":["/bin/sh"]},"mounts":[{"type":"tmpfs","destination":"/a"},{"type":"bind","source":"/x","destination":"/a/b","readOnly":false}]}}`,
	} {
		f.Add([]byte(s), true)
	}
	host := []HostEntry{{Path: "/usr", IsDir: true}, {Path: "/bin", Symlink: "usr/bin"}, {Path: "/etc/ld.so.cache"}}
	f.Fuzz(func(t *testing.T, data []byte, cgroups bool) {
		doc, err := cellos.ParseDocument(data)
		if err != nil {
			if !errors.Is(err, cellos.ErrInvalidSpec) {
				t.Fatalf("parse error without ErrInvalidSpec: %v", err)
			}
			return
		}
		in := SpecInputs{HostSystem: host}
		if cgroups {
			in.CgroupsPath = "/cellos/" + doc.Spec.ID
		}
		spec := BuildSpec(doc, in)
		out, err := MarshalSpec(spec)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		var back specs.Spec
		if err := json.Unmarshal(out, &back); err != nil {
			t.Fatalf("config.json does not parse back: %v", err)
		}
		if back.Root == nil || back.Root.Path != bundle.Rootfs {
			t.Fatalf("root %+v is not the bundle's own rootfs", back.Root)
		}
		if back.Hostname != doc.Spec.ID || back.Annotations[AnnotationCellID] != doc.Spec.ID {
			t.Fatalf("hostname %q / annotation %q differ from the id %q", back.Hostname, back.Annotations[AnnotationCellID], doc.Spec.ID)
		}
		want := fuzzExpectedMounts(doc, host)
		if len(back.Mounts) != len(want) {
			t.Fatalf("mounts %v, want %v", destinations(back.Mounts), want)
		}
		for i, m := range back.Mounts {
			if m.Destination != want[i] {
				t.Fatalf("mount %d is %q, want %q", i, m.Destination, want[i])
			}
			if !path.IsAbs(m.Destination) || path.Clean(m.Destination) != m.Destination {
				t.Fatalf("mount destination %q is not absolute and clean", m.Destination)
			}
			if m.Type == "bind" && (!path.IsAbs(m.Source) || path.Clean(m.Source) != m.Source) {
				t.Fatalf("bind source %q is not absolute and clean", m.Source)
			}
		}
		for i, dm := range doc.Spec.Mounts {
			got := back.Mounts[len(back.Mounts)-len(doc.Spec.Mounts)+i]
			ro := slices.Contains(got.Options, "ro")
			if ro != dm.IsReadOnly() || (dm.Type == cellos.MountBind && got.Source != dm.Source) {
				t.Fatalf("declared mount %+v became %+v", dm, got)
			}
		}
		if !slices.Equal(back.Process.Args, doc.Spec.Run.Argv) {
			t.Fatalf("argv changed: %q -> %q", doc.Spec.Run.Argv, back.Process.Args)
		}
		if back.Linux.CgroupsPath != in.CgroupsPath {
			t.Fatalf("cgroupsPath %q, want %q", back.Linux.CgroupsPath, in.CgroupsPath)
		}
	})
}

// fuzzExpectedMounts lists the destinations a config must have, in order.
func fuzzExpectedMounts(doc *cellos.ExecutionCellDocument, host []HostEntry) []string {
	want := []string{"/proc", "/sys"}
	if doc.Spec.Rootfs == nil {
		for _, h := range host {
			if h.Symlink == "" {
				want = append(want, h.Path)
			}
		}
	}
	if !slices.ContainsFunc(doc.Spec.Mounts, func(m cellos.MountSpec) bool { return m.Destination == "/tmp" }) {
		want = append(want, "/tmp")
	}
	for _, m := range doc.Spec.Mounts {
		want = append(want, m.Destination)
	}
	return want
}

func destinations(ms []specs.Mount) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Destination
	}
	return out
}
