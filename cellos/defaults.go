package cellos

import (
	"maps"
	"slices"
	"strings"
)

// EffectiveUser is the identity the cell's process runs as, defaults applied.
func (r *RunSpec) EffectiveUser() UserSpec {
	if r.User != nil {
		return *r.User
	}
	return UserSpec{UID: DefaultUID, GID: DefaultGID}
}

// EffectiveWorkingDir is the process's working directory, defaults applied.
func (r *RunSpec) EffectiveWorkingDir() string {
	if r.WorkingDir != "" {
		return r.WorkingDir
	}
	return DefaultWorkingDir
}

// EffectiveEnv is the process environment as KEY=value lines, sorted by key, with PATH defaulted.
// The lines share one backing string: two allocations whatever the size of the environment.
func (r *RunSpec) EffectiveEnv() []string {
	var buf [16]string
	keys := buf[:0]
	n := 0
	for k, val := range r.Env {
		keys = append(keys, k)
		n += len(k) + 1 + len(val)
	}
	if _, ok := r.Env["PATH"]; !ok {
		keys = append(keys, "PATH")
		n += len("PATH=") + len(DefaultPath)
	}
	slices.Sort(keys) // by key: sorting the lines would put "A1=" before "A="
	var b strings.Builder
	b.Grow(n)
	env := make([]string, len(keys))
	for i, k := range keys {
		val, ok := r.Env[k]
		if !ok {
			val = DefaultPath
		}
		start := b.Len()
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(val)
		env[i] = b.String()[start:] // written bytes never change: the line stays as it is
	}
	return env
}

// TTLSeconds is the cell's lifetime in seconds, 0 when unlimited.
func (s *CellSpec) TTLSeconds() int64 {
	if s.Lifetime == nil {
		return 0
	}
	return s.Lifetime.TTLSeconds
}

// WantsCgroups reports whether the cell declares memory or CPU limits.
func (s *CellSpec) WantsCgroups() bool {
	return s.Resources != nil && (s.Resources.MemoryBytes > 0 || s.Resources.CPUMillis > 0)
}

func sortedKeys(m map[string]string) []string {
	return slices.Sorted(maps.Keys(m))
}
