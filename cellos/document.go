package cellos

import (
	"errors"
	"fmt"
	"net/netip"
	"path"
	"regexp"
	"strconv"
	"strings"
)

// Limits on documents. A document beyond them is refused with ErrInvalidSpec naming the field.
const (
	MaxDocumentBytes = 1 << 20   // whole JSON document
	MaxArgs          = 4096      // entries in run.argv
	MaxEnv           = 4096      // entries in run.env
	MaxArgEnvBytes   = 256 << 10 // argv and env together, as the process sees them
	MaxPathBytes     = 4096      // any path
	MaxImageRefBytes = 4096      // rootfs.image
	MaxMounts        = 64
	MaxLabels        = 64
	MaxLabelValue    = 4096
	MaxEgressRules   = 256
	MaxTTLSeconds    = 365 * 24 * 3600
	MinMemoryBytes   = 32 << 20 // below this a gVisor sandbox cannot boot
	MinCPUMillis     = 10       // the smallest CFS quota (1 ms per 100 ms period)
	MaxCPUMillis     = 1_000_000
)

// Defaults applied when a document leaves a field out.
const (
	DefaultUID        = 65534
	DefaultGID        = 65534
	DefaultWorkingDir = "/"
	DefaultPath       = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// The grammars of ids, env names and label keys. Messages quote them; the checks are the
// hand-written matchers below, which TestMatchersAgreeWithPatterns holds to these patterns.
var (
	idPattern       = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
	envKeyPattern   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	labelKeyPattern = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$`)
)

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

// isNameByte: [A-Za-z0-9_.-], the inner bytes of ids and label keys.
func isNameByte(c byte) bool { return isAlnum(c) || c == '_' || c == '.' || c == '-' }

// ValidID reports whether id is a well-formed cell id (idPattern).
func ValidID(id string) bool {
	if len(id) == 0 || len(id) > 64 || !isAlnum(id[0]) {
		return false
	}
	for i := 1; i < len(id); i++ {
		if !isNameByte(id[i]) {
			return false
		}
	}
	return true
}

// validEnvKey matches envKeyPattern.
func validEnvKey(k string) bool {
	if len(k) == 0 || !(k[0] == '_' || isAlnum(k[0]) && !('0' <= k[0] && k[0] <= '9')) {
		return false
	}
	for i := 1; i < len(k); i++ {
		if !isAlnum(k[i]) && k[i] != '_' {
			return false
		}
	}
	return true
}

// validLabelKey matches labelKeyPattern.
func validLabelKey(k string) bool {
	if len(k) == 0 || len(k) > 63 || !isAlnum(k[0]) || !isAlnum(k[len(k)-1]) {
		return false
	}
	for i := 1; i < len(k)-1; i++ {
		if !isNameByte(k[i]) {
			return false
		}
	}
	return true
}

// CheckID returns an ErrInvalidSpec error for op when id is not a well-formed cell id.
func CheckID(op, id string) error {
	if ValidID(id) {
		return nil
	}
	return &Error{Op: op, Kind: ErrInvalidSpec, Err: FieldError{Field: "spec.id",
		Reason: fmt.Sprintf("%q must match %s (letters, digits, '_', '.', '-'; at most 64; no leading '-' or '.')", truncate(id, 80), idPattern)}}
}

// ParseDocument decodes a document strictly (unknown fields, duplicate keys, keys in the wrong
// case, a run.user without both ids and trailing data are errors) and validates it.
func ParseDocument(data []byte) (*ExecutionCellDocument, error) {
	if len(data) > MaxDocumentBytes {
		return nil, &Error{Op: "parse", CellID: peekID(data[:MaxDocumentBytes]), Kind: ErrInvalidSpec,
			Err: fmt.Errorf("document is %d bytes, the limit is %d", len(data), MaxDocumentBytes)}
	}
	doc := new(ExecutionCellDocument)
	if err := decode(data, doc); err != nil {
		return nil, &Error{Op: "parse", CellID: peekID(data), Kind: ErrInvalidSpec, Err: err}
	}
	if err := doc.Validate(); err != nil {
		var e *Error
		if errors.As(err, &e) {
			e.Op = "parse" // a fresh *Error of Validate's own
		}
		return nil, err
	}
	return doc, nil
}

// Validate checks everything about the document that does not depend on the host. It returns an
// *Error of kind ErrInvalidSpec listing every problem (FieldErrors), or nil. A valid document
// costs no allocation: messages and field paths are formatted only for problems found.
func (d *ExecutionCellDocument) Validate() error {
	if d == nil {
		return &Error{Op: "validate", Kind: ErrInvalidSpec, Err: errors.New("no document")}
	}
	var v validator
	if d.APIVersion != APIVersion {
		v.add("apiVersion", "must be %q, got %q", APIVersion, truncate(d.APIVersion, 64))
	}
	if d.Kind != Kind {
		v.add("kind", "must be %q, got %q", Kind, truncate(d.Kind, 64))
	}
	s := &d.Spec
	if !ValidID(s.ID) {
		v.add("spec.id", "%q must match %s (letters, digits, '_', '.', '-'; at most 64; no leading '-' or '.')", truncate(s.ID, 80), idPattern)
	}
	v.run(&s.Run, s.Rootfs != nil && s.Rootfs.Image != "")
	if r := s.Rootfs; r != nil {
		switch {
		case r.Image != "" && r.Path != "":
			v.add("spec.rootfs", "path and image are exclusive: give one")
		case r.Image != "":
			v.imageRef("spec.rootfs.image", r.Image)
		case r.Path == "":
			v.add("spec.rootfs.path", "is required, or spec.rootfs.image")
		default:
			v.absPath("spec.rootfs.path", r.Path)
			if r.Path == "/" {
				v.add("spec.rootfs.path", "the host's root directory cannot be a cell image")
			}
		}
	}
	v.mounts(s.Mounts, s.Rootfs == nil)
	if r := s.Resources; r != nil {
		if !(r.MemoryBytes == 0 || r.MemoryBytes >= MinMemoryBytes) {
			v.add("spec.resources.memoryBytes", "%d is below the minimum of %d (a gVisor sandbox needs that much to boot); 0 means no limit",
				r.MemoryBytes, int64(MinMemoryBytes))
		}
		if !(r.CPUMillis == 0 || (r.CPUMillis >= MinCPUMillis && r.CPUMillis <= MaxCPUMillis)) {
			v.add("spec.resources.cpuMillis", "%d is outside %d..%d; 0 means no limit", r.CPUMillis, MinCPUMillis, MaxCPUMillis)
		}
		if r.Pids < 0 {
			v.add("spec.resources.pids", "must not be negative")
		}
	}
	if n := s.Network; n != nil {
		// Over a limit, a list is refused by its length alone: checking (and reporting) each entry
		// of a list far beyond it would cost time and memory for nothing.
		if len(n.Egress) > MaxEgressRules {
			v.add("spec.network.egress", "%d rules, the limit is %d", len(n.Egress), MaxEgressRules)
		} else {
			v.egress(n.Egress)
		}
	}
	if l := s.Lifetime; l != nil && !(l.TTLSeconds >= 0 && l.TTLSeconds <= MaxTTLSeconds) {
		v.add("spec.lifetime.ttlSeconds", "%d is outside 0..%d; 0 means no limit", l.TTLSeconds, MaxTTLSeconds)
	}
	if len(s.Labels) > MaxLabels {
		v.add("spec.labels", "%d labels, the limit is %d", len(s.Labels), MaxLabels)
	} else {
		v.labels(s.Labels)
	}
	if len(v.errs) == 0 {
		return nil
	}
	id := ""
	if ValidID(s.ID) {
		id = s.ID
	}
	return &Error{Op: "validate", CellID: id, Kind: ErrInvalidSpec, Err: v.errs}
}

// validator collects the problems of a document. Its checks test first and format only what
// they report: fmt's arguments are boxed, and field paths built, on the error path alone.
type validator struct{ errs FieldErrors }

// indexed is a field path below a list entry: "spec.mounts[2].source".
func indexed(list string, i int, field string) string {
	return list + "[" + strconv.Itoa(i) + "]" + field
}

func (v *validator) egress(rules []EgressRule) {
	for i, r := range rules {
		p, err := netip.ParsePrefix(r.CIDR)
		switch {
		case err != nil:
			v.add(indexed("spec.network.egress", i, ".cidr"), "%q is not a CIDR", truncate(r.CIDR, 64))
		case p != p.Masked():
			v.add(indexed("spec.network.egress", i, ".cidr"), "%q has host bits set; did you mean %q?", r.CIDR, p.Masked())
		}
		if !(r.Port >= 1 && r.Port <= 65535) {
			v.add(indexed("spec.network.egress", i, ".port"), "%d is not a port (1..65535)", r.Port)
		}
		if !(r.Protocol == "tcp" || r.Protocol == "udp") {
			v.add(indexed("spec.network.egress", i, ".protocol"), "must be \"tcp\" or \"udp\", got %q", truncate(r.Protocol, 16))
		}
	}
}

func (v *validator) labels(labels map[string]string) {
	clean := true
	for k, val := range labels {
		if !validLabelKey(k) || !validLabelValue(val) {
			clean = false
			break
		}
	}
	if clean {
		return
	}
	for _, k := range sortedKeys(labels) { // every problem, in a stable order
		if !validLabelKey(k) {
			v.add("spec.labels", "key %q must match %s", truncate(k, 80), labelKeyPattern)
		}
		if !validLabelValue(labels[k]) {
			v.add("spec.labels."+truncate(k, 80), "value must be at most %d bytes without NUL", MaxLabelValue)
		}
	}
}

func validLabelValue(val string) bool {
	return len(val) <= MaxLabelValue && strings.IndexByte(val, 0) < 0
}

func (v *validator) add(field, format string, args ...any) {
	v.errs = append(v.errs, FieldError{Field: field, Reason: fmt.Sprintf(format, args...)})
}

// cleanAbs reports whether p is an absolute, clean path without NUL, within MaxPathBytes.
func cleanAbs(p string) bool {
	return p != "" && len(p) <= MaxPathBytes && strings.IndexByte(p, 0) < 0 && path.IsAbs(p) && path.Clean(p) == p
}

// absPath checks that p is an absolute, clean path without NUL, and reports whether it is.
func (v *validator) absPath(field, p string) bool {
	if cleanAbs(p) {
		return true
	}
	v.pathProblem(field, p)
	return false
}

// pathProblem reports what is wrong with p, which is not cleanAbs.
func (v *validator) pathProblem(field, p string) {
	switch {
	case p == "":
		v.add(field, "is required")
	case len(p) > MaxPathBytes:
		v.add(field, "is %d bytes, the limit is %d", len(p), MaxPathBytes)
	case strings.ContainsRune(p, 0):
		v.add(field, "contains a NUL byte")
	case !path.IsAbs(p):
		v.add(field, "%q must be absolute", truncate(p, 256))
	default:
		v.add(field, "%q is not clean (no '..', '.', '//' or trailing '/'); did you mean %q?", truncate(p, 256), path.Clean(p))
	}
}

// imageRef checks what can be checked of an image reference without parsing it: the backend
// parses it when it resolves the image, and refuses what does not parse there, naming the field.
func (v *validator) imageRef(field, ref string) {
	if len(ref) > MaxImageRefBytes {
		v.add(field, "%d bytes, the limit is %d", len(ref), MaxImageRefBytes)
		return
	}
	for _, c := range ref {
		if c <= ' ' || c == 0x7f || c == '\uFFFD' {
			v.add(field, "%q contains a space, a control character or invalid UTF-8", truncate(ref, 256))
			return
		}
	}
}

// run checks the process. With an image root, argv may be absent (nil): the image's
// Entrypoint+Cmd run then; an empty list is still refused.
func (v *validator) run(r *RunSpec, image bool) {
	total := 0
	switch {
	case r.Argv == nil && image:
	case len(r.Argv) == 0 && image:
		v.add("spec.run.argv", "must not be empty; leave it out to run the image's entrypoint and command")
	case len(r.Argv) == 0:
		v.add("spec.run.argv", "is required and must not be empty")
	case len(r.Argv) > MaxArgs:
		v.add("spec.run.argv", "%d arguments, the limit is %d", len(r.Argv), MaxArgs)
	default:
		if r.Argv[0] == "" {
			v.add("spec.run.argv[0]", "must not be empty")
		}
		for i, a := range r.Argv {
			if strings.IndexByte(a, 0) >= 0 {
				v.add(indexed("spec.run.argv", i, ""), "contains a NUL byte")
			}
			total += len(a) + 1
		}
	}
	if len(r.Env) > MaxEnv {
		v.add("spec.run.env", "%d variables, the limit is %d", len(r.Env), MaxEnv)
	} else {
		total += v.env(r.Env)
	}
	if total > MaxArgEnvBytes {
		v.add("spec.run", "argv and env take %d bytes, the limit is %d", total, MaxArgEnvBytes)
	}
	if r.WorkingDir != "" {
		v.absPath("spec.run.workingDir", r.WorkingDir)
	}
	if u := r.User; u != nil {
		if u.UID == ^uint32(0) {
			v.add("spec.run.user.uid", "4294967295 is not a valid uid")
		}
		if u.GID == ^uint32(0) {
			v.add("spec.run.user.gid", "4294967295 is not a valid gid")
		}
	}
}

// env checks the environment and returns the bytes its well-named variables take.
func (v *validator) env(env map[string]string) int {
	total := 0
	for k, val := range env {
		if !validEnvKey(k) || strings.IndexByte(val, 0) >= 0 {
			total = -1
			break
		}
		total += len(k) + len(val) + 2
	}
	if total >= 0 {
		return total
	}
	total = 0
	for _, k := range sortedKeys(env) { // every problem, in a stable order
		val := env[k]
		if !validEnvKey(k) {
			v.add("spec.run.env", "%q is not a POSIX variable name", truncate(k, 80))
			continue
		}
		if strings.IndexByte(val, 0) >= 0 {
			v.add("spec.run.env."+k, "contains a NUL byte")
		}
		total += len(k) + len(val) + 2
	}
	return total
}

// SystemPaths are the host directories and files a cell without a rootfs sees read-only.
var SystemPaths = []string{"/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/alternatives", "/etc/ld.so.cache"}

// reservedDestinations are managed by the sandbox itself; mounting over them hides what the
// workload needs or what isolates it.
var reservedDestinations = []string{"/proc", "/sys", "/dev"}

func (v *validator) mounts(ms []MountSpec, hostSystem bool) {
	if len(ms) > MaxMounts {
		// Refused by the count alone: the checks below compare every pair of mounts.
		v.add("spec.mounts", "%d mounts, the limit is %d", len(ms), MaxMounts)
		return
	}
	type placed struct {
		index int
		dest  string
		bind  bool
	}
	var buf [MaxMounts]placed
	seen := buf[:0]
	for i, m := range ms {
		switch m.Type {
		case MountBind:
			if !cleanAbs(m.Source) {
				v.pathProblem(indexed("spec.mounts", i, ".source"), m.Source)
			}
			if m.SizeBytes != 0 {
				v.add(indexed("spec.mounts", i, ".sizeBytes"), "applies to tmpfs mounts only")
			}
		case MountTmpfs:
			if m.Source != "" {
				v.add(indexed("spec.mounts", i, ".source"), "must be empty for a tmpfs mount")
			}
			if m.SizeBytes < 0 {
				v.add(indexed("spec.mounts", i, ".sizeBytes"), "must not be negative")
			}
		default:
			v.add(indexed("spec.mounts", i, ".type"), "must be %q or %q, got %q", MountBind, MountTmpfs, truncate(m.Type, 32))
		}
		d := m.Destination
		if !cleanAbs(d) {
			v.pathProblem(indexed("spec.mounts", i, ".destination"), d)
			continue
		}
		if d == "/" {
			v.add(indexed("spec.mounts", i, ".destination"), "must not shadow the root")
			continue
		}
		for _, r := range reservedDestinations {
			if within(d, r) {
				v.add(indexed("spec.mounts", i, ".destination"), "%q would shadow %s, which the sandbox manages", d, r)
			}
		}
		if hostSystem {
			for _, s := range SystemPaths {
				if within(d, s) || within(s, d) {
					v.add(indexed("spec.mounts", i, ".destination"), "%q overlaps the host system path %s that a cell without rootfs sees", d, s)
				}
			}
		}
		for _, p := range seen { // one conflict per mount: n equal destinations are not n² problems
			if p.dest == d {
				v.add(indexed("spec.mounts", i, ".destination"), "%q is already mounted by spec.mounts[%d]", d, p.index)
				break
			}
			if p.bind && within(d, p.dest) {
				v.add(indexed("spec.mounts", i, ".destination"), "%q lies inside the bind mount at %s: its mount point would be created in the host directory", d, p.dest)
				break
			}
			if within(p.dest, d) {
				v.add(indexed("spec.mounts", i, ".destination"), "%q would hide the earlier mount at %s; list it first", d, p.dest)
				break
			}
		}
		seen = append(seen, placed{i, d, m.Type == MountBind})
	}
}

// within reports whether p is dir or below it.
func within(p, dir string) bool {
	return strings.HasPrefix(p, dir) && (len(p) == len(dir) || p[len(dir)] == '/')
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
