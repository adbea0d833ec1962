package cellos

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"path"
	"reflect"
	"regexp"
	"strings"
)

// Limits on documents. A document beyond them is refused with ErrInvalidSpec naming the field.
const (
	MaxDocumentBytes = 1 << 20   // whole JSON document
	MaxArgs          = 4096      // entries in run.argv
	MaxEnv           = 4096      // entries in run.env
	MaxArgEnvBytes   = 256 << 10 // argv and env together, as the process sees them
	MaxPathBytes     = 4096      // any path
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

var (
	idPattern       = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
	envKeyPattern   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	labelKeyPattern = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$`)
)

// ValidID reports whether id is a well-formed cell id.
func ValidID(id string) bool { return idPattern.MatchString(id) }

// CheckID returns an ErrInvalidSpec error for op when id is not a well-formed cell id.
func CheckID(op, id string) error {
	if ValidID(id) {
		return nil
	}
	return &Error{Op: op, Kind: ErrInvalidSpec, Err: FieldError{Field: "spec.id",
		Reason: fmt.Sprintf("%q must match %s (letters, digits, '_', '.', '-'; at most 64; no leading '-' or '.')", truncate(id, 80), idPattern)}}
}

// ParseDocument decodes a document strictly (unknown fields, duplicate keys, keys in the wrong
// case and trailing data are errors) and validates it.
func ParseDocument(data []byte) (*ExecutionCellDocument, error) {
	if len(data) > MaxDocumentBytes {
		return nil, &Error{Op: "parse", CellID: peekID(data[:MaxDocumentBytes]), Kind: ErrInvalidSpec,
			Err: fmt.Errorf("document is %d bytes, the limit is %d", len(data), MaxDocumentBytes)}
	}
	if err := checkShape(data); err != nil {
		return nil, &Error{Op: "parse", CellID: peekID(data), Kind: ErrInvalidSpec, Err: err}
	}
	var doc ExecutionCellDocument
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&doc); err != nil {
		return nil, &Error{Op: "parse", CellID: peekID(data), Kind: ErrInvalidSpec, Err: describeJSONError(err)}
	}
	if err := doc.Validate(); err != nil {
		var e *Error
		if errors.As(err, &e) {
			e.Op = "parse"
		}
		return nil, err
	}
	return &doc, nil
}

// peekID finds spec.id in a document that may not decode (trailing data, a syntax error after
// the id, a truncated prefix), so errors can name the cell. It reads no further than the id.
func peekID(data []byte) string {
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return ""
	}
	for dec.More() {
		key, err := dec.Token()
		if err != nil {
			return ""
		}
		if key != "spec" {
			if skipValue(dec) != nil {
				return ""
			}
			continue
		}
		if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
			return ""
		}
		for dec.More() {
			key, err := dec.Token()
			if err != nil {
				return ""
			}
			if key != "id" {
				if skipValue(dec) != nil {
					return ""
				}
				continue
			}
			tok, err := dec.Token()
			if id, ok := tok.(string); err == nil && ok && ValidID(id) {
				return id
			}
			return ""
		}
		return ""
	}
	return ""
}

func skipValue(dec *json.Decoder) error {
	var raw json.RawMessage
	return dec.Decode(&raw)
}

func describeJSONError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) && te.Field != "" {
		return FieldError{Field: te.Field, Reason: fmt.Sprintf("expected %s, got %s", te.Type, te.Value)}
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("malformed JSON at byte %d: %w", se.Offset, err)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("malformed JSON: the document ends early: %w", err)
	}
	return err
}

var docType = reflect.TypeFor[ExecutionCellDocument]()

// checkShape walks the JSON token stream against the document's Go types. encoding/json alone
// would accept duplicate keys (the last wins) and keys in any letter case: either could silently
// drop a declared limit.
func checkShape(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := walkValue(dec, docType, ""); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after the document")
	}
	return nil
}

func walkValue(dec *json.Decoder, t reflect.Type, at string) error {
	tok, err := dec.Token()
	if err != nil {
		return describeJSONError(err)
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if tok == nil {
		return nil // null: the zero value
	}
	delim, isDelim := tok.(json.Delim)
	switch t.Kind() {
	case reflect.Struct, reflect.Map:
		if !isDelim || delim != '{' {
			return FieldError{Field: fieldName(at), Reason: "expected an object"}
		}
		seen := map[string]bool{}
		for dec.More() {
			kt, err := dec.Token()
			if err != nil {
				return describeJSONError(err)
			}
			key := kt.(string)
			sub := join(at, key)
			if seen[key] {
				return FieldError{Field: sub, Reason: "duplicate key"}
			}
			seen[key] = true
			var elem reflect.Type
			if t.Kind() == reflect.Map {
				elem = t.Elem()
			} else if elem = jsonField(t, key); elem == nil {
				return FieldError{Field: sub, Reason: "unknown field" + suggest(t, key)}
			}
			if err := walkValue(dec, elem, sub); err != nil {
				return err
			}
		}
		if _, err := dec.Token(); err != nil { // '}'
			return describeJSONError(err)
		}
		return nil
	case reflect.Slice:
		if !isDelim || delim != '[' {
			return FieldError{Field: fieldName(at), Reason: "expected an array"}
		}
		for i := 0; dec.More(); i++ {
			if err := walkValue(dec, t.Elem(), fmt.Sprintf("%s[%d]", at, i)); err != nil {
				return err
			}
		}
		if _, err := dec.Token(); err != nil { // ']'
			return describeJSONError(err)
		}
		return nil
	default:
		if isDelim {
			return FieldError{Field: fieldName(at), Reason: "expected a " + t.Kind().String() + ", got a structure"}
		}
		return nil
	}
}

func fieldName(at string) string {
	if at == "" {
		return "(document)"
	}
	return at
}

func join(at, key string) string {
	if at == "" {
		return key
	}
	return at + "." + key
}

func jsonField(t reflect.Type, key string) reflect.Type {
	for i := range t.NumField() {
		f := t.Field(i)
		if name, _, _ := strings.Cut(f.Tag.Get("json"), ","); name == key {
			return f.Type
		}
	}
	return nil
}

// suggest names the field a misspelt key was probably meant to be (same letters, other case).
func suggest(t reflect.Type, key string) string {
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if strings.EqualFold(name, key) {
			return fmt.Sprintf(" (did you mean %q?)", name)
		}
	}
	return ""
}

// Validate checks everything about the document that does not depend on the host. It returns an
// *Error of kind ErrInvalidSpec listing every problem (FieldErrors), or nil.
func (d *ExecutionCellDocument) Validate() error {
	if d == nil {
		return &Error{Op: "validate", Kind: ErrInvalidSpec, Err: errors.New("no document")}
	}
	var v validator
	v.check(d.APIVersion == APIVersion, "apiVersion", "must be %q, got %q", APIVersion, truncate(d.APIVersion, 64))
	v.check(d.Kind == Kind, "kind", "must be %q, got %q", Kind, truncate(d.Kind, 64))
	s := &d.Spec
	if !ValidID(s.ID) {
		v.add("spec.id", "%q must match %s (letters, digits, '_', '.', '-'; at most 64; no leading '-' or '.')", truncate(s.ID, 80), idPattern)
	}
	v.run(&s.Run)
	if s.Rootfs != nil {
		v.absPath("spec.rootfs.path", s.Rootfs.Path)
		v.check(s.Rootfs.Path != "/", "spec.rootfs.path", "the host's root directory cannot be a cell image")
	}
	v.mounts(s.Mounts, s.Rootfs == nil)
	if r := s.Resources; r != nil {
		v.check(r.MemoryBytes == 0 || r.MemoryBytes >= MinMemoryBytes, "spec.resources.memoryBytes",
			"%d is below the minimum of %d (a gVisor sandbox needs that much to boot); 0 means no limit", r.MemoryBytes, int64(MinMemoryBytes))
		v.check(r.CPUMillis == 0 || (r.CPUMillis >= MinCPUMillis && r.CPUMillis <= MaxCPUMillis), "spec.resources.cpuMillis",
			"%d is outside %d..%d; 0 means no limit", r.CPUMillis, MinCPUMillis, MaxCPUMillis)
		v.check(r.Pids >= 0, "spec.resources.pids", "must not be negative")
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
	if l := s.Lifetime; l != nil {
		v.check(l.TTLSeconds >= 0 && l.TTLSeconds <= MaxTTLSeconds, "spec.lifetime.ttlSeconds",
			"%d is outside 0..%d; 0 means no limit", l.TTLSeconds, MaxTTLSeconds)
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

type validator struct{ errs FieldErrors }

func (v *validator) egress(rules []EgressRule) {
	for i, r := range rules {
		f := fmt.Sprintf("spec.network.egress[%d]", i)
		p, err := netip.ParsePrefix(r.CIDR)
		switch {
		case err != nil:
			v.add(f+".cidr", "%q is not a CIDR", truncate(r.CIDR, 64))
		case p != p.Masked():
			v.add(f+".cidr", "%q has host bits set; did you mean %q?", r.CIDR, p.Masked())
		}
		v.check(r.Port >= 1 && r.Port <= 65535, f+".port", "%d is not a port (1..65535)", r.Port)
		v.check(r.Protocol == "tcp" || r.Protocol == "udp", f+".protocol", "must be \"tcp\" or \"udp\", got %q", truncate(r.Protocol, 16))
	}
}

func (v *validator) labels(labels map[string]string) {
	for _, k := range sortedKeys(labels) {
		v.check(labelKeyPattern.MatchString(k), "spec.labels", "key %q must match %s", truncate(k, 80), labelKeyPattern)
		val := labels[k]
		v.check(len(val) <= MaxLabelValue && !strings.ContainsRune(val, 0), "spec.labels."+truncate(k, 80),
			"value must be at most %d bytes without NUL", MaxLabelValue)
	}
}

func (v *validator) add(field, format string, args ...any) {
	v.errs = append(v.errs, FieldError{Field: field, Reason: fmt.Sprintf(format, args...)})
}

func (v *validator) check(ok bool, field, format string, args ...any) {
	if !ok {
		v.add(field, format, args...)
	}
}

// absPath checks that p is an absolute, clean path without NUL, and reports whether it is.
func (v *validator) absPath(field, p string) bool {
	switch {
	case p == "":
		v.add(field, "is required")
	case len(p) > MaxPathBytes:
		v.add(field, "is %d bytes, the limit is %d", len(p), MaxPathBytes)
	case strings.ContainsRune(p, 0):
		v.add(field, "contains a NUL byte")
	case !path.IsAbs(p):
		v.add(field, "%q must be absolute", truncate(p, 256))
	case path.Clean(p) != p:
		v.add(field, "%q is not clean (no '..', '.', '//' or trailing '/'); did you mean %q?", truncate(p, 256), path.Clean(p))
	default:
		return true
	}
	return false
}

func (v *validator) run(r *RunSpec) {
	total := 0
	switch {
	case len(r.Argv) == 0:
		v.add("spec.run.argv", "is required and must not be empty")
	case len(r.Argv) > MaxArgs:
		v.add("spec.run.argv", "%d arguments, the limit is %d", len(r.Argv), MaxArgs)
	default:
		v.check(r.Argv[0] != "", "spec.run.argv[0]", "must not be empty")
		for i, a := range r.Argv {
			v.check(!strings.ContainsRune(a, 0), fmt.Sprintf("spec.run.argv[%d]", i), "contains a NUL byte")
			total += len(a) + 1
		}
	}
	var keys []string
	if len(r.Env) > MaxEnv {
		v.add("spec.run.env", "%d variables, the limit is %d", len(r.Env), MaxEnv)
	} else {
		keys = sortedKeys(r.Env)
	}
	for _, k := range keys {
		val := r.Env[k]
		if !envKeyPattern.MatchString(k) {
			v.add("spec.run.env", "%q is not a POSIX variable name", truncate(k, 80))
			continue
		}
		v.check(!strings.ContainsRune(val, 0), "spec.run.env."+k, "contains a NUL byte")
		total += len(k) + len(val) + 2
	}
	v.check(total <= MaxArgEnvBytes, "spec.run", "argv and env take %d bytes, the limit is %d", total, MaxArgEnvBytes)
	if r.WorkingDir != "" {
		v.absPath("spec.run.workingDir", r.WorkingDir)
	}
	if u := r.User; u != nil {
		v.check(u.UID != ^uint32(0), "spec.run.user.uid", "4294967295 is not a valid uid")
		v.check(u.GID != ^uint32(0), "spec.run.user.gid", "4294967295 is not a valid gid")
	}
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
	var seen []placed
	for i, m := range ms {
		f := fmt.Sprintf("spec.mounts[%d]", i)
		switch m.Type {
		case MountBind:
			v.absPath(f+".source", m.Source)
			v.check(m.SizeBytes == 0, f+".sizeBytes", "applies to tmpfs mounts only")
		case MountTmpfs:
			v.check(m.Source == "", f+".source", "must be empty for a tmpfs mount")
			v.check(m.SizeBytes >= 0, f+".sizeBytes", "must not be negative")
		default:
			v.add(f+".type", "must be %q or %q, got %q", MountBind, MountTmpfs, truncate(m.Type, 32))
		}
		d := m.Destination
		if !v.absPath(f+".destination", d) {
			continue
		}
		if d == "/" {
			v.add(f+".destination", "must not shadow the root")
			continue
		}
		for _, r := range reservedDestinations {
			v.check(!within(d, r), f+".destination", "%q would shadow %s, which the sandbox manages", d, r)
		}
		if hostSystem {
			for _, s := range SystemPaths {
				v.check(!within(d, s) && !within(s, d), f+".destination",
					"%q overlaps the host system path %s that a cell without rootfs sees", d, s)
			}
		}
		for _, p := range seen { // one conflict per mount: n equal destinations are not n² problems
			if p.dest == d {
				v.add(f+".destination", "%q is already mounted by spec.mounts[%d]", d, p.index)
				break
			}
			if p.bind && within(d, p.dest) {
				v.add(f+".destination", "%q lies inside the bind mount at %s: its mount point would be created in the host directory", d, p.dest)
				break
			}
			if within(p.dest, d) {
				v.add(f+".destination", "%q would hide the earlier mount at %s; list it first", d, p.dest)
				break
			}
		}
		seen = append(seen, placed{i, d, m.Type == MountBind})
	}
}

// within reports whether p is dir or below it.
func within(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, dir+"/")
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
