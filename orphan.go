package gvisor

import (
	"context"
	"time"
)

// stopOrphaned ends a cell whose shim is gone while runsc still holds its container: the shim was
// killed, and `runsc run` and the sandbox may live on. SIGKILL through runsc first, as for a cell
// with a shim: a surviving `runsc run` then reaps its sandbox and removes the container itself. A
// forced delete of a running container without it is the slow path: Debian's runsc waits for the
// orphaned sandbox to be reaped by PID 1 and gives up after 5 s ("stopping container: context
// deadline exceeded"). It waits, within killGrace, for the sandbox to be gone; the caller deletes
// whatever state is left.
func (b *Backend) stopOrphaned(c *cell) {
	if c.runsc.Path == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), killGrace)
	defer cancel()
	st, err := c.runsc.State(ctx, c.paths.runscID)
	if err != nil || st.Pid <= 0 || st.Status != "running" {
		return // not running: a forced delete is quick
	}
	start, err := processStart(st.Pid)
	if err != nil {
		return
	}
	sandbox := pidRecord{Pid: st.Pid, Start: start}
	if err := c.runsc.Kill(ctx, c.paths.runscID, "KILL"); err != nil {
		return
	}
	for delay := 5 * time.Millisecond; sandbox.Alive() && ctx.Err() == nil; delay = min(2*delay, 100*time.Millisecond) {
		time.Sleep(delay)
	}
	// A surviving `runsc run` removes the container once it has reaped the sandbox.
	for delay := 5 * time.Millisecond; len(c.runsc.StateFiles(c.paths.runscID)) > 0 && ctx.Err() == nil && delay < time.Second; delay *= 2 {
		time.Sleep(delay)
	}
}
