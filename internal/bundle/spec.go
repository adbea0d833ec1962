// Package bundle owns what a cell's OCI bundle is made of: the runtime config built from the
// document (config.json, through runtime-spec's types and encoding/json), the root of a cell
// without an image (the host's system symlinks and a minimal /etc), the overlay of an image
// root, the names of the bundle's files, the records the library keeps in it, and its removal.
package bundle

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// OCIVersion is the runtime-spec version config.json declares: every field the library writes
// exists in 1.0.2, the version Debian's runsc implements.
const OCIVersion = "1.0.2"

// Annotation keys written into config.json.
const (
	AnnotationCellID      = "cellos.dev/cell-id"
	AnnotationLabelPrefix = "cellos.dev/label."
)

// DefaultTmpSize is the size of the /tmp a cell gets when it declares none and has no memory
// limit; with one, /tmp is as large as the limit (its files are the sandbox's memory).
const DefaultTmpSize = 512 << 20

// cpuPeriodMicros is the CFS period the CPU quota is expressed in.
const cpuPeriodMicros = 100_000

// HostEntry is one host system path as a cell without rootfs sees it: a directory or file
// bind-mounted read-only, or a symlink recreated inside the cell's root (Debian's /bin -> usr/bin).
type HostEntry struct {
	Path    string // absolute path on the host and in the cell
	Symlink string // the link target when Path is a symlink on the host
	IsDir   bool
}

// ProbeHostSystem lists the system paths of this host that exist (cellos.SystemPaths).
func ProbeHostSystem() []HostEntry {
	var out []HostEntry
	for _, p := range cellos.SystemPaths {
		fi, err := os.Lstat(p)
		if err != nil {
			continue
		}
		e := HostEntry{Path: p, IsDir: fi.IsDir()}
		if fi.Mode()&os.ModeSymlink != 0 {
			if e.Symlink, err = os.Readlink(p); err != nil {
				continue
			}
		}
		out = append(out, e)
	}
	return out
}

// SpecInputs is what the config depends on besides the document.
type SpecInputs struct {
	HostSystem  []HostEntry // what a cell without rootfs sees of the host; see ProbeHostSystem
	CgroupsPath string      // linux.cgroupsPath; "" when the cell has no limits
	NetNSPath   string      // the network namespace to join (a cell with egress rules); "" for a new, empty one
	// Sources are the bind mounts' sources with symlinks resolved, by mount index; a mount
	// without one uses the document's source.
	Sources map[int]string
}

// BuildSpec turns a validated document into the OCI runtime config of its bundle. The result is
// deterministic for a given document and inputs, and the caller's own: nothing in it is shared
// with another call or with the document.
func BuildSpec(doc *cellos.ExecutionCellDocument, in SpecInputs) *specs.Spec {
	s := &doc.Spec
	user := s.Run.EffectiveUser()
	spec := &specs.Spec{
		Version: OCIVersion,
		Process: &specs.Process{
			User:            specs.User{UID: user.UID, GID: user.GID},
			Args:            slices.Clone(s.Run.Argv),
			Env:             s.Run.EffectiveEnv(),
			Cwd:             s.Run.EffectiveWorkingDir(),
			Capabilities:    NoCapabilities(),
			NoNewPrivileges: true,
		},
		Root:        &specs.Root{Path: Rootfs, Readonly: s.Rootfs == nil || !s.Rootfs.Writable},
		Hostname:    s.ID,
		Mounts:      mounts(s, in.HostSystem, in.Sources),
		Annotations: annotations(s),
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
			{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace},
			{Type: specs.MountNamespace}, {Type: specs.NetworkNamespace, Path: in.NetNSPath},
		}},
	}
	if in.CgroupsPath != "" {
		spec.Linux.CgroupsPath = in.CgroupsPath
		spec.Linux.Resources = resources(s.Resources)
	}
	return spec
}

// NoCapabilities is a process's capability sets, every one of them explicitly empty.
func NoCapabilities() *specs.LinuxCapabilities {
	return &specs.LinuxCapabilities{Bounding: []string{}, Effective: []string{}, Inheritable: []string{}, Permitted: []string{}, Ambient: []string{}}
}

// annotations name the cell and carry its labels.
func annotations(s *cellos.CellSpec) map[string]string {
	ann := map[string]string{AnnotationCellID: s.ID}
	for k, v := range s.Labels {
		ann[AnnotationLabelPrefix+k] = v
	}
	return ann
}

func mounts(s *cellos.CellSpec, host []HostEntry, sources map[int]string) []specs.Mount {
	ms := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
	}
	if s.Rootfs == nil {
		for _, h := range host {
			if h.Symlink != "" {
				continue // recreated as a symlink inside the root; see WriteRootfs
			}
			opt := "rbind"
			if !h.IsDir {
				opt = "bind"
			}
			ms = append(ms, specs.Mount{Destination: h.Path, Type: "bind", Source: h.Path, Options: []string{opt, "ro", "nosuid", "nodev"}})
		}
	}
	if !slices.ContainsFunc(s.Mounts, func(m cellos.MountSpec) bool { return m.Destination == "/tmp" }) {
		size := int64(DefaultTmpSize)
		if r := s.Resources; r != nil && r.MemoryBytes > 0 {
			size = r.MemoryBytes
		}
		ms = append(ms, specs.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs",
			Options: []string{"nosuid", "nodev", "mode=1777", "size=" + strconv.FormatInt(size, 10)}})
	}
	for i, m := range s.Mounts {
		mode := "rw"
		if m.IsReadOnly() {
			mode = "ro"
		}
		switch m.Type {
		case cellos.MountBind:
			src := m.Source
			if r, ok := sources[i]; ok {
				src = r
			}
			ms = append(ms, specs.Mount{Destination: m.Destination, Type: "bind", Source: src, Options: []string{"rbind", mode, "nosuid", "nodev"}})
		case cellos.MountTmpfs:
			opts := []string{mode, "nosuid", "nodev", "mode=1777"}
			if m.SizeBytes > 0 {
				opts = append(opts, "size="+strconv.FormatInt(m.SizeBytes, 10))
			}
			ms = append(ms, specs.Mount{Destination: m.Destination, Type: "tmpfs", Source: "tmpfs", Options: opts})
		}
	}
	return ms
}

func resources(r *cellos.ResourceSpec) *specs.LinuxResources {
	if r == nil {
		return nil // a cgroup without limits
	}
	out := &specs.LinuxResources{}
	if r.MemoryBytes > 0 {
		limit := r.MemoryBytes
		out.Memory = &specs.LinuxMemory{Limit: &limit, Swap: &limit}
	}
	if r.CPUMillis > 0 {
		quota, period := r.CPUMillis*cpuPeriodMicros/1000, uint64(cpuPeriodMicros)
		out.CPU = &specs.LinuxCPU{Quota: &quota, Period: &period}
	}
	return out
}

// MarshalSpec renders config.json with encoding/json: indented, newline-terminated, HTML
// characters as they are. Struct fields come in the order runtime-spec declares them and map keys
// sorted, so the bytes are deterministic for a given spec.
func MarshalSpec(spec *specs.Spec) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(spec); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// EtcFiles is the minimal /etc of a cell without rootfs: its user and group by name, localhost
// and its hostname, and no name servers.
func EtcFiles(s *cellos.CellSpec) map[string]string {
	u := s.Run.EffectiveUser()
	passwd := "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
	group := "root:x:0:\nnogroup:x:65534:\n"
	if u.UID != 0 && u.UID != cellos.DefaultUID {
		passwd += fmt.Sprintf("cell:x:%d:%d:cell:/:/usr/sbin/nologin\n", u.UID, u.GID)
	}
	if u.GID != 0 && u.GID != cellos.DefaultGID {
		group += fmt.Sprintf("cell:x:%d:\n", u.GID)
	}
	return map[string]string{
		"passwd":      passwd,
		"group":       group,
		"hosts":       "127.0.0.1\tlocalhost " + s.ID + "\n::1\tlocalhost ip6-localhost ip6-loopback\n",
		"hostname":    s.ID + "\n",
		"resolv.conf": "",
	}
}

// overlayUnsafe lists characters an image path cannot contain: the overlay mount options use
// them as separators.
const overlayUnsafe = ",:\\"

// CheckImagePath refuses an image directory the overlay mount options cannot express.
func CheckImagePath(p string) error {
	if strings.ContainsAny(p, overlayUnsafe) {
		return fmt.Errorf("%q contains one of %q, which an overlay mount cannot express", p, overlayUnsafe)
	}
	return nil
}
