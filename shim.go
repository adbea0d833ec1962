package gvisor

import (
	"github.com/cellos/cellos-host-gvisor/internal/proc"
	"github.com/cellos/cellos-host-gvisor/internal/shim"
)

// The library's binary doubles as its shims and keepers (internal/shim): re-executed with their
// argv0 and environment, it runs them instead of the program. This is the package's one init hook;
// it does nothing in any other process.
func init() { shim.Main() }

// pidRecord identifies a process across pid reuse: its pid and its start time.
type pidRecord = proc.Ident

// processStart reads a process's start time from /proc.
func processStart(pid int) (uint64, error) {
	st, err := proc.ReadStat(pid)
	return st.Start, err
}
