package gvisor

import (
	"reflect"
	"slices"
	"strconv"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// MarshalSpec writes what BuildSpec makes without encoding/json, and BuildSpec allocates its parts
// together. These tests hold both to the straightforward versions they replaced: the writer to
// encoding/json (marshalSpecJSON) for every field of the runtime spec, and BuildSpec to
// buildSpecReference, the original code kept here.

// requireSameJSON checks that MarshalSpec writes spec exactly as encoding/json does.
func requireSameJSON(t testing.TB, spec *specs.Spec) {
	t.Helper()
	want, err := marshalSpecJSON(spec)
	require.NoError(t, err)
	got, err := MarshalSpec(spec)
	require.NoError(t, err)
	require.Equal(t, string(want), string(got))
}

// trickyStrings are what JSON string escaping gets wrong.
var trickyStrings = []string{
	"", "plain", `"quoted"`, `back\slash`, "<&>", "\u2028\u2029", "tab\there", "nl\ncr\rff\fbs\b",
	"\x00\x01\x1f\x7f", "\xff", "a\xc3", "\xe2\x80", "\xed\xa0\x80", "Zoë ✓ 😀", "\ufffd", "/srv/a b",
}

func TestSpecWriterMatchesEncodingJSON(t *testing.T) {
	for _, c := range goldenCases {
		t.Run(c.name, func(t *testing.T) {
			doc := parseSpec(t, c.doc)
			spec := BuildSpec(doc, c.inputs(doc))
			require.True(t, specWritable(spec), "BuildSpec's output is written without encoding/json")
			requireSameJSON(t, spec)
		})
	}
	t.Run("strings", func(t *testing.T) {
		for _, s := range trickyStrings {
			for b := range 256 {
				s := s + string([]byte{byte(b)})
				spec := BuildSpec(parseSpec(t, goldenCases[1].doc), SpecInputs{HostSystem: goldenHost(), CgroupsPath: "/x"})
				setStrings(spec, s)
				requireSameJSON(t, spec)
			}
		}
	})
	t.Run("sparse", func(t *testing.T) {
		requireSameJSON(t, nil)
		requireSameJSON(t, &specs.Spec{})
		doc := parseSpec(t, goldenCases[1].doc)
		for _, clear := range []func(s *specs.Spec){
			func(s *specs.Spec) { s.Process = nil },
			func(s *specs.Spec) { s.Root = nil },
			func(s *specs.Spec) { s.Linux = nil },
			func(s *specs.Spec) { s.Mounts, s.Annotations = nil, nil },
			func(s *specs.Spec) { s.Mounts, s.Annotations = []specs.Mount{}, map[string]string{} },
			func(s *specs.Spec) { s.Process.Capabilities = nil; s.Process.Args = nil; s.Process.Env = []string{} },
			func(s *specs.Spec) { s.Linux.Resources = &specs.LinuxResources{} },
			func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.UserNamespace, Path: "/proc/1/ns/user"}}
			},
			func(s *specs.Spec) { s.Mounts[0].Options = []string{} },
		} {
			spec := BuildSpec(doc, SpecInputs{HostSystem: goldenHost(), CgroupsPath: "/x"})
			clear(spec)
			requireSameJSON(t, spec)
		}
	})
}

// setStrings puts s into every kind of string BuildSpec writes: a hostname, a map key and value,
// list entries, an option.
func setStrings(spec *specs.Spec, s string) {
	spec.Hostname = s
	spec.Annotations[s] = s
	spec.Annotations["k"+s] = "v" + s
	spec.Process.Args = append(spec.Process.Args, s)
	spec.Process.Env[0] = s
	spec.Process.Cwd = s
	spec.Mounts[0].Options[0] = s
	spec.Mounts[1].Destination = s
	spec.Linux.CgroupsPath = s
}

// TestSpecWriterFields sets every field of the runtime spec in turn, to a full value and to an
// empty one (an empty list, a pointer to a zero value): the writer must write it as encoding/json
// does, or leave the spec to encoding/json. A field the writer neither writes nor refuses (one
// added by a newer runtime-spec, say) fails here.
func TestSpecWriterFields(t *testing.T) {
	doc := parseSpec(t, goldenCases[1].doc)
	base := func() *specs.Spec {
		return BuildSpec(doc, SpecInputs{HostSystem: goldenHost(), CgroupsPath: "/cellos/x"})
	}
	var paths [][]int
	fieldPaths(reflect.TypeFor[specs.Spec](), nil, &paths)
	require.Greater(t, len(paths), 100)
	for _, p := range paths {
		for _, full := range []bool{true, false} {
			spec := base()
			v := reflect.ValueOf(spec).Elem()
			name := ""
			for j, i := range p {
				name += "." + v.Type().Field(i).Name
				v = v.Field(i)
				if j < len(p)-1 {
					v = into(v)
				}
			}
			if full {
				fill(v, 8)
			} else {
				empty(v)
			}
			t.Run(name+"/"+strconv.FormatBool(full), func(t *testing.T) { requireSameJSON(t, spec) })
		}
	}
}

// fieldPaths lists the paths (field indexes, through pointers and lists) of every exported field
// below struct type t.
func fieldPaths(t reflect.Type, prefix []int, out *[][]int) {
	if len(prefix) > 8 {
		return
	}
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		p := append(slices.Clone(prefix), i)
		*out = append(*out, p)
		ft := f.Type
		for ft.Kind() == reflect.Pointer || ft.Kind() == reflect.Slice {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct {
			fieldPaths(ft, p, out)
		}
	}
}

// into goes through pointers and lists to the struct below v, making them as needed.
func into(v reflect.Value) reflect.Value {
	for {
		switch v.Kind() {
		case reflect.Pointer:
			if v.IsNil() {
				v.Set(reflect.New(v.Type().Elem()))
			}
			v = v.Elem()
		case reflect.Slice:
			if v.Len() == 0 {
				v.Set(reflect.MakeSlice(v.Type(), 1, 1))
			}
			v = v.Index(0)
		default:
			return v
		}
	}
}

// fill gives v a value that is not empty at any level.
func fill(v reflect.Value, depth int) {
	if depth == 0 {
		return
	}
	switch v.Kind() {
	case reflect.Pointer:
		p := reflect.New(v.Type().Elem())
		fill(p.Elem(), depth-1)
		v.Set(p)
	case reflect.Struct:
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				fill(v.Field(i), depth-1)
			}
		}
	case reflect.Slice:
		s := reflect.MakeSlice(v.Type(), 2, 2)
		fill(s.Index(0), depth-1)
		fill(s.Index(1), depth-1)
		v.Set(s)
	case reflect.Map:
		m := reflect.MakeMap(v.Type())
		for _, key := range []string{"b<", "a&"} {
			k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
			if k.Kind() == reflect.String {
				k.SetString(key)
			} else {
				fill(k, depth-1)
			}
			fill(e, depth-1)
			m.SetMapIndex(k, e)
		}
		v.Set(m)
	case reflect.String:
		v.SetString("x<&>\u2028\"")
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(-7)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(7)
	case reflect.Float32, reflect.Float64:
		v.SetFloat(1.5)
	}
}

// empty gives v a value that omitempty leaves out, when it has one that is not nil: an empty list
// or map, a pointer to a zero value.
func empty(v reflect.Value) {
	switch v.Kind() {
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 0, 0))
	case reflect.Map:
		v.Set(reflect.MakeMap(v.Type()))
	default:
		v.Set(reflect.Zero(v.Type()))
	}
}

// TestBuildSpecMatchesReference compares BuildSpec with the original code on every golden case.
func TestBuildSpecMatchesReference(t *testing.T) {
	for _, c := range goldenCases {
		for _, in := range []SpecInputs{{}, {HostSystem: goldenHost()}, {HostSystem: goldenHost(), CgroupsPath: "/cellos/x"}} {
			doc := parseSpec(t, c.doc)
			require.Equal(t, buildSpecReference(doc, in), BuildSpec(doc, in), c.name)
		}
	}
}

// TestBuildSpecOwnsItsResult: the parts BuildSpec allocates together are still the caller's alone.
func TestBuildSpecOwnsItsResult(t *testing.T) {
	doc := parseSpec(t, goldenCases[3].doc) // mounts
	in := SpecInputs{HostSystem: goldenHost(), CgroupsPath: "/cellos/m"}
	a, b := BuildSpec(doc, in), BuildSpec(doc, in)
	want, err := MarshalSpec(b)
	require.NoError(t, err)

	// Appending to one mount's options must not write into the next one's.
	next := slices.Clone(a.Mounts[1].Options)
	a.Mounts[0].Options = append(a.Mounts[0].Options, "exec")
	assert.Equal(t, next, a.Mounts[1].Options)
	for i := range a.Mounts {
		a.Mounts[i].Options[0] = "changed"
	}
	a.Process.Env[0] = "X=changed"
	a.Process.Args[0] = "changed"
	a.Process.Capabilities.Bounding = append(a.Process.Capabilities.Bounding, "CAP_SYS_ADMIN")
	a.Linux.Namespaces[0].Path = "/proc/1/ns/pid"
	a.Linux.Namespaces = append(a.Linux.Namespaces, specs.LinuxNamespace{Type: specs.UserNamespace})
	a.Annotations["x"] = "y"

	got, err := MarshalSpec(b)
	require.NoError(t, err)
	assert.Equal(t, string(want), string(got), "a second result is untouched")
	assert.Empty(t, b.Process.Capabilities.Bounding)
	assert.Equal(t, "/bin/ls", doc.Spec.Run.Argv[0], "the document is untouched")
}

func FuzzSpecWriter(f *testing.F) {
	for _, c := range goldenCases {
		f.Add([]byte(`{"apiVersion": "cellos.dev/v1", "kind": "ExecutionCell", "spec": `+c.doc+`}`), "", c.cgroups)
	}
	for _, s := range trickyStrings {
		f.Add([]byte(`{}`), s, true)
	}
	fallback := parseSpec(f, goldenCases[1].doc)
	f.Fuzz(func(t *testing.T, data []byte, s string, cgroups bool) {
		doc, err := cellos.ParseDocument(data)
		if err != nil {
			doc = fallback
		}
		in := SpecInputs{HostSystem: goldenHost()}
		if cgroups {
			in.CgroupsPath = "/cellos/" + doc.Spec.ID
		}
		spec := BuildSpec(doc, in)
		require.Equal(t, buildSpecReference(doc, in), spec)
		requireSameJSON(t, spec)
		if len(spec.Mounts) > 1 {
			setStrings(spec, s)
			requireSameJSON(t, spec)
		}
	})
}

// buildSpecReference is BuildSpec as it was before it was made to allocate less.
func buildSpecReference(doc *cellos.ExecutionCellDocument, in SpecInputs) *specs.Spec {
	s := &doc.Spec
	user := s.Run.EffectiveUser()
	empty := []string{}
	spec := &specs.Spec{
		Version: OCIVersion,
		Process: &specs.Process{
			User: specs.User{UID: user.UID, GID: user.GID},
			Args: slices.Clone(s.Run.Argv),
			Env:  referenceEnv(&s.Run),
			Cwd:  s.Run.EffectiveWorkingDir(),
			Capabilities: &specs.LinuxCapabilities{
				Bounding: empty, Effective: empty, Inheritable: empty, Permitted: empty, Ambient: empty,
			},
			NoNewPrivileges: true,
		},
		Root:     &specs.Root{Path: dirRootfs, Readonly: s.Rootfs == nil || !s.Rootfs.Writable},
		Hostname: s.ID,
		Mounts:   buildMountsReference(s, in.HostSystem),
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
		if r := s.Resources; r != nil {
			out := &specs.LinuxResources{}
			if r.MemoryBytes > 0 {
				limit := r.MemoryBytes
				out.Memory = &specs.LinuxMemory{Limit: &limit, Swap: &limit}
			}
			if r.CPUMillis > 0 {
				quota, period := r.CPUMillis*cpuPeriodMicros/1000, uint64(cpuPeriodMicros)
				out.CPU = &specs.LinuxCPU{Quota: &quota, Period: &period}
			}
			spec.Linux.Resources = out
		}
	}
	return spec
}

func referenceEnv(r *cellos.RunSpec) []string {
	keys := make([]string, 0, len(r.Env)+1)
	for k := range r.Env {
		keys = append(keys, k)
	}
	if _, ok := r.Env["PATH"]; !ok {
		keys = append(keys, "PATH")
	}
	slices.Sort(keys)
	env := make([]string, 0, len(keys))
	for _, k := range keys {
		val, ok := r.Env[k]
		if !ok {
			val = cellos.DefaultPath
		}
		env = append(env, k+"="+val)
	}
	return env
}

func buildMountsReference(s *cellos.CellSpec, host []HostEntry) []specs.Mount {
	ms := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
	}
	if s.Rootfs == nil {
		for _, h := range host {
			if h.Symlink != "" {
				continue
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
		size := int64(DefaultTmpSize)
		if s.Resources != nil && s.Resources.MemoryBytes > 0 {
			size = s.Resources.MemoryBytes
		}
		ms = append(ms, specs.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs",
			Options: []string{"nosuid", "nodev", "mode=1777", "size=" + strconv.FormatInt(size, 10)}})
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
