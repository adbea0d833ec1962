package gvisor

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
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

	fileMarker       = "cellos.json"   // bundleMarker: the first file of every bundle
	fileExitReserve  = "exit.json.tmp" // the exit record's space, reserved at Create
	fileControlNetns = "control.netns" // the cell's control network namespace (runsc.NetNS)
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
	NetNSPath   string      // the network namespace to join (a cell with egress rules); "" for a new, empty one
	// Sources are the bind mounts' sources with symlinks resolved, by mount index (see
	// checkPolicy); a mount without one uses the document's source.
	Sources map[int]string
}

// DefaultTmpSize is the size of the /tmp a cell gets when it declares none and has no memory
// limit; with one, /tmp is as large as the limit (its files are the sandbox's memory).
const DefaultTmpSize = 512 << 20

// BuildSpec turns a validated document into the OCI runtime config of its bundle. The result is
// deterministic for a given document and inputs, and the caller's own: nothing in it is shared
// with another call or with the document.
func BuildSpec(doc *cellos.ExecutionCellDocument, in SpecInputs) *specs.Spec {
	s := &doc.Spec
	user := s.Run.EffectiveUser()
	// The parts every config has, in one allocation.
	p := new(struct {
		spec  specs.Spec
		proc  specs.Process
		caps  specs.LinuxCapabilities
		root  specs.Root
		linux specs.Linux
		ns    [5]specs.LinuxNamespace
	})
	empty := []string{}
	p.caps = specs.LinuxCapabilities{Bounding: empty, Effective: empty, Inheritable: empty, Permitted: empty, Ambient: empty}
	p.proc = specs.Process{
		User:            specs.User{UID: user.UID, GID: user.GID},
		Args:            slices.Clone(s.Run.Argv),
		Env:             s.Run.EffectiveEnv(),
		Cwd:             s.Run.EffectiveWorkingDir(),
		Capabilities:    &p.caps,
		NoNewPrivileges: true,
	}
	p.root = specs.Root{Path: dirRootfs, Readonly: s.Rootfs == nil || !s.Rootfs.Writable}
	p.ns = [5]specs.LinuxNamespace{
		{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace},
		{Type: specs.MountNamespace}, {Type: specs.NetworkNamespace, Path: in.NetNSPath},
	}
	p.linux = specs.Linux{Namespaces: p.ns[:]}
	p.spec = specs.Spec{
		Version:     OCIVersion,
		Process:     &p.proc,
		Root:        &p.root,
		Hostname:    s.ID,
		Mounts:      buildMounts(s, in.HostSystem, in.Sources),
		Linux:       &p.linux,
		Annotations: buildAnnotations(s),
	}
	if in.CgroupsPath != "" {
		p.linux.CgroupsPath = in.CgroupsPath
		p.linux.Resources = buildResources(s.Resources)
	}
	return &p.spec
}

// buildAnnotations names the cell and carries its labels.
func buildAnnotations(s *cellos.CellSpec) map[string]string {
	ann := make(map[string]string, 1+len(s.Labels))
	ann[AnnotationCellID] = s.ID
	n := 0
	for k := range s.Labels {
		n += len(AnnotationLabelPrefix) + len(k)
	}
	var keys strings.Builder // the keys share one backing string
	keys.Grow(n)
	for k, v := range s.Labels {
		start := keys.Len()
		keys.WriteString(AnnotationLabelPrefix)
		keys.WriteString(k)
		ann[keys.String()[start:]] = v // written bytes never change: the key stays as it is
	}
	return ann
}

func buildMounts(s *cellos.CellSpec, host []HostEntry, sources map[int]string) []specs.Mount {
	var hostMounts []HostEntry
	if s.Rootfs == nil {
		hostMounts = host
	}
	tmpDeclared := false
	for _, m := range s.Mounts {
		tmpDeclared = tmpDeclared || m.Destination == "/tmp"
	}
	// Count first: the mounts, and their options in one backing array; each mount's options are
	// a window of it whose capacity ends where the next one starts, so that appending to one
	// never writes into another.
	nm, no := 2+len(s.Mounts), 3+4
	for _, h := range hostMounts {
		if h.Symlink == "" {
			nm, no = nm+1, no+4
		}
	}
	if !tmpDeclared {
		nm, no = nm+1, no+4
	}
	no += 5 * len(s.Mounts)
	ms := make([]specs.Mount, 0, nm)
	opts := make([]string, 0, no)
	add := func(dest, typ, src string, o ...string) {
		start := len(opts)
		opts = append(opts, o...)
		ms = append(ms, specs.Mount{Destination: dest, Type: typ, Source: src, Options: opts[start:len(opts):len(opts)]})
	}
	add("/proc", "proc", "proc", "nosuid", "noexec", "nodev")
	add("/sys", "sysfs", "sysfs", "nosuid", "noexec", "nodev", "ro")
	for _, h := range hostMounts {
		if h.Symlink != "" {
			continue // recreated as a symlink inside the root; see writeRootfs
		}
		opt := "rbind"
		if !h.IsDir {
			opt = "bind"
		}
		add(h.Path, "bind", h.Path, opt, "ro", "nosuid", "nodev")
	}
	if !tmpDeclared {
		size := int64(DefaultTmpSize)
		if r := s.Resources; r != nil && r.MemoryBytes > 0 {
			size = r.MemoryBytes
		}
		add("/tmp", "tmpfs", "tmpfs", "nosuid", "nodev", "mode=1777", "size="+strconv.FormatInt(size, 10))
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
			add(m.Destination, "bind", src, "rbind", mode, "nosuid", "nodev")
		case cellos.MountTmpfs:
			if m.SizeBytes > 0 {
				var buf [32]byte
				size := string(strconv.AppendInt(append(buf[:0], "size="...), m.SizeBytes, 10))
				add(m.Destination, "tmpfs", "tmpfs", mode, "nosuid", "nodev", "mode=1777", size)
			} else {
				add(m.Destination, "tmpfs", "tmpfs", mode, "nosuid", "nodev", "mode=1777")
			}
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
	p := new(struct { // in one allocation
		out          specs.LinuxResources
		mem          specs.LinuxMemory
		cpu          specs.LinuxCPU
		limit, quota int64
		period       uint64
	})
	if r.MemoryBytes > 0 {
		p.limit = r.MemoryBytes
		p.mem = specs.LinuxMemory{Limit: &p.limit, Swap: &p.limit}
		p.out.Memory = &p.mem
	}
	if r.CPUMillis > 0 {
		p.quota, p.period = r.CPUMillis*cpuPeriodMicros/1000, uint64(cpuPeriodMicros)
		p.cpu = specs.LinuxCPU{Quota: &p.quota, Period: &p.period}
		p.out.CPU = &p.cpu
	}
	return &p.out
}

// MarshalSpec renders config.json: indented, keys in a fixed order, newline-terminated. The bytes
// are exactly those of encoding/json's Encoder with SetEscapeHTML(false) and SetIndent("", "  "):
// a writer for the parts of the runtime spec that BuildSpec fills produces them without
// reflection (one allocation, the result); a spec using any other part goes to encoding/json.
func MarshalSpec(spec *specs.Spec) ([]byte, error) {
	if spec == nil || !specWritable(spec) {
		return marshalSpecJSON(spec)
	}
	bp := specBuffers.Get().(*[]byte)
	w := specWriter{b: (*bp)[:0]}
	w.spec(spec)
	w.b = append(w.b, '\n')
	out := bytes.Clone(w.b)
	if cap(w.b) <= 64<<10 { // a rare huge config does not stay pinned in the pool
		*bp = w.b
		specBuffers.Put(bp)
	}
	return out, nil
}

// marshalSpecJSON is MarshalSpec with encoding/json, for any spec.
func marshalSpecJSON(spec *specs.Spec) ([]byte, error) {
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
func writeRootfs(root *owned.Dir, s *cellos.CellSpec, host []HostEntry) error {
	if err := writeHostLinks(root, host); err != nil {
		return err
	}
	etc, err := root.Mkdir("etc", 0o755)
	if err != nil {
		return err
	}
	defer etc.Close()
	files := etcFiles(s)
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if err := etc.WriteFile(name, []byte(files[name]), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// writeHostLinks recreates the host's system symlinks (Debian's /bin -> usr/bin) in root.
func writeHostLinks(root *owned.Dir, host []HostEntry) error {
	for _, h := range host {
		if h.Symlink == "" {
			continue
		}
		parent, name := filepath.Split(strings.TrimPrefix(h.Path, "/"))
		d := root
		for _, comp := range strings.Split(strings.Trim(parent, "/"), "/") {
			if comp == "" {
				continue
			}
			next, err := d.OpenDir(comp)
			if errors.Is(err, fs.ErrNotExist) {
				next, err = d.Mkdir(comp, 0o755)
			}
			if d != root {
				_ = d.Close()
			}
			if err != nil {
				return err
			}
			d = next
		}
		err := d.Symlink(h.Symlink, name)
		if d != root {
			_ = d.Close()
		}
		if err != nil {
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

// specBuffers holds the scratch buffers MarshalSpec writes into before copying the result out.
var specBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// specWritable reports whether specWriter can write spec: whether it leaves empty every part of
// the runtime spec that specWriter does not write. TestSpecWriterFields sets every field of the
// runtime spec in turn to hold this list complete.
func specWritable(s *specs.Spec) bool {
	if s.Hooks != nil || s.Solaris != nil || s.Windows != nil || s.VM != nil || s.ZOS != nil || s.FreeBSD != nil {
		return false
	}
	if p := s.Process; p != nil && (p.ConsoleSize != nil || len(p.Rlimits) > 0 || p.OOMScoreAdj != nil ||
		p.Scheduler != nil || p.IOPriority != nil || p.ExecCPUAffinity != nil) {
		return false
	}
	for _, m := range s.Mounts {
		if len(m.UIDMappings) > 0 || len(m.GIDMappings) > 0 {
			return false
		}
	}
	if l := s.Linux; l != nil {
		if len(l.UIDMappings) > 0 || len(l.GIDMappings) > 0 || len(l.Sysctl) > 0 || len(l.Devices) > 0 ||
			len(l.NetDevices) > 0 || l.Seccomp != nil || l.IntelRdt != nil || l.MemoryPolicy != nil ||
			l.Personality != nil || len(l.TimeOffsets) > 0 {
			return false
		}
		if r := l.Resources; r != nil && (len(r.Devices) > 0 || r.BlockIO != nil || len(r.HugepageLimits) > 0 ||
			r.Network != nil || len(r.Rdma) > 0 || len(r.Unified) > 0) {
			return false
		}
	}
	return true
}

// specWriter writes a spec as encoding/json does: fields in declaration order, omitempty fields
// left out when empty, map keys sorted, strings escaped as with SetEscapeHTML(false), and
// indented as json.Indent(dst, src, "", "  ") does (an empty object or list stays "{}" or "[]").
type specWriter struct {
	b     []byte
	depth int
}

func (w *specWriter) newline() {
	w.b = append(w.b, '\n')
	for range w.depth {
		w.b = append(w.b, ' ', ' ')
	}
}

func (w *specWriter) open(c byte) {
	w.b = append(w.b, c)
	w.depth++
}

// close ends the object or list open at this depth; empty: nothing was written in it.
func (w *specWriter) close(c byte, empty bool) {
	w.depth--
	if !empty {
		w.newline()
	}
	w.b = append(w.b, c)
}

// key starts a member of the object being written; first is the object's own flag.
func (w *specWriter) key(first *bool, name string) {
	w.elem(first)
	w.b = append(w.b, '"')
	w.b = append(w.b, name...)
	w.b = append(w.b, '"', ':', ' ')
}

// elem starts an element of the list (or a member of the object) being written.
func (w *specWriter) elem(first *bool) {
	if !*first {
		w.b = append(w.b, ',')
	}
	*first = false
	w.newline()
}

func (w *specWriter) uint(v uint64) { w.b = strconv.AppendUint(w.b, v, 10) }
func (w *specWriter) int(v int64)   { w.b = strconv.AppendInt(w.b, v, 10) }
func (w *specWriter) bool(v bool)   { w.b = strconv.AppendBool(w.b, v) }

const hexDigits = "0123456789abcdef"

// str writes a JSON string as encoding/json does without HTML escaping: '"', '\\' and control
// characters escaped, invalid UTF-8 as \ufffd, U+2028 and U+2029 escaped.
func (w *specWriter) str(s string) {
	b := append(w.b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= ' ' && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	w.b = append(b, '"')
}

func (w *specWriter) strings(l []string) {
	first := true
	w.open('[')
	for _, s := range l {
		w.elem(&first)
		w.str(s)
	}
	w.close(']', first)
}

// stringMap writes a map with its keys sorted, as encoding/json does.
func (w *specWriter) stringMap(m map[string]string) {
	var buf [16]string
	keys := buf[:0]
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	first := true
	w.open('{')
	for _, k := range keys {
		w.elem(&first)
		w.str(k)
		w.b = append(w.b, ':', ' ')
		w.str(m[k])
	}
	w.close('}', first)
}

func (w *specWriter) spec(s *specs.Spec) {
	first := true
	w.open('{')
	w.key(&first, "ociVersion")
	w.str(s.Version)
	if s.Process != nil {
		w.key(&first, "process")
		w.process(s.Process)
	}
	if r := s.Root; r != nil {
		w.key(&first, "root")
		f := true
		w.open('{')
		w.key(&f, "path")
		w.str(r.Path)
		if r.Readonly {
			w.key(&f, "readonly")
			w.bool(true)
		}
		w.close('}', f)
	}
	if s.Hostname != "" {
		w.key(&first, "hostname")
		w.str(s.Hostname)
	}
	if s.Domainname != "" {
		w.key(&first, "domainname")
		w.str(s.Domainname)
	}
	if len(s.Mounts) > 0 {
		w.key(&first, "mounts")
		w.mounts(s.Mounts)
	}
	if len(s.Annotations) > 0 {
		w.key(&first, "annotations")
		w.stringMap(s.Annotations)
	}
	if s.Linux != nil {
		w.key(&first, "linux")
		w.linux(s.Linux)
	}
	w.close('}', first)
}

func (w *specWriter) process(p *specs.Process) {
	first := true
	w.open('{')
	if p.Terminal {
		w.key(&first, "terminal")
		w.bool(true)
	}
	w.key(&first, "user")
	w.user(&p.User)
	if len(p.Args) > 0 {
		w.key(&first, "args")
		w.strings(p.Args)
	}
	if p.CommandLine != "" {
		w.key(&first, "commandLine")
		w.str(p.CommandLine)
	}
	if len(p.Env) > 0 {
		w.key(&first, "env")
		w.strings(p.Env)
	}
	w.key(&first, "cwd")
	w.str(p.Cwd)
	if c := p.Capabilities; c != nil {
		w.key(&first, "capabilities")
		f := true
		w.open('{')
		for _, set := range [...]struct {
			name string
			caps []string
		}{{"bounding", c.Bounding}, {"effective", c.Effective}, {"inheritable", c.Inheritable},
			{"permitted", c.Permitted}, {"ambient", c.Ambient}} {
			if len(set.caps) > 0 {
				w.key(&f, set.name)
				w.strings(set.caps)
			}
		}
		w.close('}', f)
	}
	if p.NoNewPrivileges {
		w.key(&first, "noNewPrivileges")
		w.bool(true)
	}
	if p.ApparmorProfile != "" {
		w.key(&first, "apparmorProfile")
		w.str(p.ApparmorProfile)
	}
	if p.SelinuxLabel != "" {
		w.key(&first, "selinuxLabel")
		w.str(p.SelinuxLabel)
	}
	w.close('}', first)
}

func (w *specWriter) user(u *specs.User) {
	first := true
	w.open('{')
	w.key(&first, "uid")
	w.uint(uint64(u.UID))
	w.key(&first, "gid")
	w.uint(uint64(u.GID))
	if u.Umask != nil {
		w.key(&first, "umask")
		w.uint(uint64(*u.Umask))
	}
	if len(u.AdditionalGids) > 0 {
		w.key(&first, "additionalGids")
		f := true
		w.open('[')
		for _, g := range u.AdditionalGids {
			w.elem(&f)
			w.uint(uint64(g))
		}
		w.close(']', f)
	}
	if u.Username != "" {
		w.key(&first, "username")
		w.str(u.Username)
	}
	w.close('}', first)
}

func (w *specWriter) mounts(ms []specs.Mount) {
	first := true
	w.open('[')
	for i := range ms {
		m := &ms[i]
		w.elem(&first)
		f := true
		w.open('{')
		w.key(&f, "destination")
		w.str(m.Destination)
		if m.Type != "" {
			w.key(&f, "type")
			w.str(m.Type)
		}
		if m.Source != "" {
			w.key(&f, "source")
			w.str(m.Source)
		}
		if len(m.Options) > 0 {
			w.key(&f, "options")
			w.strings(m.Options)
		}
		w.close('}', f)
	}
	w.close(']', first)
}

func (w *specWriter) linux(l *specs.Linux) {
	first := true
	w.open('{')
	if r := l.Resources; r != nil {
		w.key(&first, "resources")
		w.resources(r)
	}
	if l.CgroupsPath != "" {
		w.key(&first, "cgroupsPath")
		w.str(l.CgroupsPath)
	}
	if len(l.Namespaces) > 0 {
		w.key(&first, "namespaces")
		f := true
		w.open('[')
		for _, ns := range l.Namespaces {
			w.elem(&f)
			nf := true
			w.open('{')
			w.key(&nf, "type")
			w.str(string(ns.Type))
			if ns.Path != "" {
				w.key(&nf, "path")
				w.str(ns.Path)
			}
			w.close('}', nf)
		}
		w.close(']', f)
	}
	if l.RootfsPropagation != "" {
		w.key(&first, "rootfsPropagation")
		w.str(l.RootfsPropagation)
	}
	if len(l.MaskedPaths) > 0 {
		w.key(&first, "maskedPaths")
		w.strings(l.MaskedPaths)
	}
	if len(l.ReadonlyPaths) > 0 {
		w.key(&first, "readonlyPaths")
		w.strings(l.ReadonlyPaths)
	}
	if l.MountLabel != "" {
		w.key(&first, "mountLabel")
		w.str(l.MountLabel)
	}
	w.close('}', first)
}

// optInt and the like write an omitempty pointer field: left out when nil.
func (w *specWriter) optInt(first *bool, name string, v *int64) {
	if v != nil {
		w.key(first, name)
		w.int(*v)
	}
}

func (w *specWriter) optUint(first *bool, name string, v *uint64) {
	if v != nil {
		w.key(first, name)
		w.uint(*v)
	}
}

func (w *specWriter) optBool(first *bool, name string, v *bool) {
	if v != nil {
		w.key(first, name)
		w.bool(*v)
	}
}

func (w *specWriter) resources(r *specs.LinuxResources) {
	first := true
	w.open('{')
	if m := r.Memory; m != nil {
		w.key(&first, "memory")
		f := true
		w.open('{')
		w.optInt(&f, "limit", m.Limit)
		w.optInt(&f, "reservation", m.Reservation)
		w.optInt(&f, "swap", m.Swap)
		//lint:ignore SA1019 deprecated, but encoding/json writes it when set, and so does this
		w.optInt(&f, "kernel", m.Kernel)
		w.optInt(&f, "kernelTCP", m.KernelTCP)
		w.optUint(&f, "swappiness", m.Swappiness)
		w.optBool(&f, "disableOOMKiller", m.DisableOOMKiller)
		w.optBool(&f, "useHierarchy", m.UseHierarchy)
		w.optBool(&f, "checkBeforeUpdate", m.CheckBeforeUpdate)
		w.close('}', f)
	}
	if c := r.CPU; c != nil {
		w.key(&first, "cpu")
		f := true
		w.open('{')
		w.optUint(&f, "shares", c.Shares)
		w.optInt(&f, "quota", c.Quota)
		w.optUint(&f, "burst", c.Burst)
		w.optUint(&f, "period", c.Period)
		w.optInt(&f, "realtimeRuntime", c.RealtimeRuntime)
		w.optUint(&f, "realtimePeriod", c.RealtimePeriod)
		if c.Cpus != "" {
			w.key(&f, "cpus")
			w.str(c.Cpus)
		}
		if c.Mems != "" {
			w.key(&f, "mems")
			w.str(c.Mems)
		}
		w.optInt(&f, "idle", c.Idle)
		w.close('}', f)
	}
	if p := r.Pids; p != nil {
		w.key(&first, "pids")
		f := true
		w.open('{')
		w.optInt(&f, "limit", p.Limit)
		w.close('}', f)
	}
	w.close('}', first)
}
