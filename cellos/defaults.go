package cellos

import (
	"maps"
	"slices"
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
func (r *RunSpec) EffectiveEnv() []string {
	keys := sortedKeys(r.Env)
	if _, ok := r.Env["PATH"]; !ok {
		keys = append(keys, "PATH")
		slices.Sort(keys) // by key: sorting the lines would put "A1=" before "A="
	}
	env := make([]string, 0, len(keys))
	for _, k := range keys {
		val, ok := r.Env[k]
		if !ok {
			val = DefaultPath
		}
		env = append(env, k+"="+val)
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
