package gvisor

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
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

// Files and directories of a bundle, relative to <bundle root>/<cell id>.
const (
	fileConfig   = "config.json"
	fileShim     = "shim.json"
	fileShimPid  = "shim.pid"
	fileShimLog  = "shim.log"
	fileExit     = "exit.json"
	fileStdout   = "stdout.log"
	fileStderr   = "stderr.log"
	fileRunscLog = "runsc.log"
	dirRootfs    = "rootfs"
	dirOverlay   = "overlay" // tmpfs holding the upper and work directories of an image root
)

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
}

// BuildSpec turns a validated document into the OCI runtime config of its bundle. The result is
// deterministic for a given document and inputs.
func BuildSpec(doc *cellos.ExecutionCellDocument, in SpecInputs) *specs.Spec {
	s := &doc.Spec
	user := s.Run.EffectiveUser()
	empty := []string{}
	spec := &specs.Spec{
		Version: OCIVersion,
		Process: &specs.Process{
			User: specs.User{UID: user.UID, GID: user.GID},
			Args: slices.Clone(s.Run.Argv),
			Env:  s.Run.EffectiveEnv(),
			Cwd:  s.Run.EffectiveWorkingDir(),
			Capabilities: &specs.LinuxCapabilities{
				Bounding: empty, Effective: empty, Inheritable: empty, Permitted: empty, Ambient: empty,
			},
			NoNewPrivileges: true,
		},
		Root:     &specs.Root{Path: dirRootfs, Readonly: s.Rootfs == nil || !s.Rootfs.Writable},
		Hostname: s.ID,
		Mounts:   buildMounts(s, in.HostSystem),
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace},
				{Type: specs.MountNamespace}, {Type: specs.NetworkNamespace},
			},
		},
		Annotations: map[string]string{AnnotationCellID: s.ID},
	}
	for k, v := range s.Labels {
		spec.Annotations[AnnotationLabelPrefix+k] = v
	}
	if in.CgroupsPath != "" {
		spec.Linux.CgroupsPath = in.CgroupsPath
		spec.Linux.Resources = buildResources(s.Resources)
	}
	return spec
}

func buildMounts(s *cellos.CellSpec, host []HostEntry) []specs.Mount {
	ms := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
	}
	if s.Rootfs == nil {
		for _, h := range host {
			if h.Symlink != "" {
				continue // recreated as a symlink inside the root; see writeRootfs
			}
			opt := "rbind"
			if !h.IsDir {
				opt = "bind"
			}
			ms = append(ms, specs.Mount{Destination: h.Path, Type: "bind", Source: h.Path,
				Options: []string{opt, "ro", "nosuid", "nodev"}})
		}
	}
	tmpDeclared := false
	for _, m := range s.Mounts {
		tmpDeclared = tmpDeclared || m.Destination == "/tmp"
	}
	if !tmpDeclared {
		ms = append(ms, specs.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs",
			Options: []string{"nosuid", "nodev", "mode=1777"}})
	}
	for _, m := range s.Mounts {
		mode := "rw"
		if m.IsReadOnly() {
			mode = "ro"
		}
		switch m.Type {
		case cellos.MountBind:
			ms = append(ms, specs.Mount{Destination: m.Destination, Type: "bind", Source: m.Source,
				Options: []string{"rbind", mode, "nosuid", "nodev"}})
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

// cpuPeriodMicros is the CFS period the CPU quota is expressed in.
const cpuPeriodMicros = 100_000

func buildResources(r *cellos.ResourceSpec) *specs.LinuxResources {
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

// MarshalSpec renders config.json: indented, keys in a fixed order, newline-terminated.
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

// etcFiles is the minimal /etc of a cell without rootfs: its user and group by name, localhost
// and its hostname, and no name servers.
func etcFiles(s *cellos.CellSpec) map[string]string {
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

// writeRootfs fills the root of a cell without rootfs: the host's system symlinks and a minimal
// /etc. Everything else the cell sees is a mount.
func writeRootfs(root string, s *cellos.CellSpec, host []HostEntry) error {
	for _, h := range host {
		if h.Symlink == "" {
			continue
		}
		dst := filepath.Join(root, h.Path)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if err := os.Symlink(h.Symlink, dst); err != nil {
			return err
		}
	}
	etc := filepath.Join(root, "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return err
	}
	for _, dir := range []string{root, etc} {
		if err := os.Chmod(dir, 0o755); err != nil {
			return err
		}
	}
	files := etcFiles(s)
	for _, name := range slices.Sorted(maps.Keys(files)) {
		path := filepath.Join(etc, name)
		if err := os.WriteFile(path, []byte(files[name]), 0o644); err != nil {
			return err
		}
		if err := os.Chmod(path, 0o644); err != nil { // whatever the umask: the cell's user reads it
			return err
		}
	}
	return nil
}

// overlayUnsafe lists characters an image path cannot contain: the overlay mount options use
// them as separators.
const overlayUnsafe = ",:\\"

func checkImagePath(p string) error {
	if strings.ContainsAny(p, overlayUnsafe) {
		return fmt.Errorf("%q contains one of %q, which an overlay mount cannot express", p, overlayUnsafe)
	}
	return nil
}
