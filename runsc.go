package gvisor

import "github.com/cellos/cellos-host-gvisor/internal/runsc"

// RunscID is the runsc container id of a cell: a fixed-width digest of the bundle root and the
// cell id. runsc matches ids by prefix, so ids of one width are never ambiguous; and ids are
// global on the host (abstract sockets), so two bundle roots never share one.
func RunscID(bundleRoot, cellID string) string {
	return runsc.CellID(bundleRoot, cellID)
}

// RunscError is a failed runsc invocation: its arguments, exit code and what it printed.
type RunscError = runsc.Error

// ContainerState is runsc's view of a container (`runsc state`, `runsc list --format=json`).
type ContainerState = runsc.ContainerState
