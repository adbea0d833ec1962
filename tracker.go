package gvisor

import (
	"sync"
	"sync/atomic"

	"github.com/cellos/cellos-host-gvisor/internal/shim"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/follow"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
)

// cell is what the backend knows of one cell. The fields above the line are fixed once Create has
// finished (ready is closed); the exit fields are fixed once exited is closed; the teardown fields
// once teardown is closed. The tracker's mutex guards the entry's place in the map, destroying
// and teardown; nothing else is guarded by a lock, and no lock is held while waiting.
type cell struct {
	id     string
	paths  cellPaths
	runsc  *runsc.Runsc
	ready  chan struct{} // closed when Create has finished, successfully or not
	handle cellos.CellHandle

	dir      *owned.Dir // the bundle directory, opened when the cell was created or found
	shim     *shim.Proc // the shim when this process started it; nil for adopted cells
	pid      pidRecord
	follower *follow.Follower
	memory   string // the memory cgroup directory, "" without limits

	net     *cellNet       // the cell's own network when it has egress rules (network.go); nil without
	sources map[int]string // its bind mounts' resolved sources (checkPolicy)
	layers  []string       // an image root's layers, lowest first (image.go)
	// ----
	created bool // Create succeeded (or Recover adopted it); false for placeholders

	exited  chan struct{} // closed when status and waitErr are final
	status  cellos.ExitStatus
	waitErr error

	runscFailed bool        // a teardown's runsc delete failed; set and read by the teardown only
	killSent    atomic.Bool // a teardown has sent the cell SIGKILL

	destroying bool          // guarded by tracker.mu
	teardown   chan struct{} // guarded by tracker.mu; closed when Destroy has finished
	report     cellos.TeardownReport
	destroyErr error

	started atomic.Bool // runsc has shown the container running: operations need not wait for it
}

// cellPaths are where a cell lives on the host.
type cellPaths struct {
	root    string // bundle root
	bundle  string // <root>/<id>
	runscID string
}

// tracker maps cell ids to cells. An id is in the map from the moment a Create or Destroy claims
// it until that operation has finished, so the two never work on the same id at once.
type tracker struct {
	mu    sync.Mutex
	cells map[string]*cell
}

func newTracker() *tracker { return &tracker{cells: map[string]*cell{}} }

// claim adds c unless its id is taken; it returns the existing entry otherwise.
func (t *tracker) claim(c *cell) *cell {
	t.mu.Lock()
	defer t.mu.Unlock()
	if old, ok := t.cells[c.id]; ok {
		return old
	}
	t.cells[c.id] = c
	return nil
}

func (t *tracker) get(id string) *cell {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.cells[id]
}

// release removes c (if it is still the entry for its id) and returns how many created cells
// remain.
func (t *tracker) release(c *cell) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cells[c.id] == c {
		delete(t.cells, c.id)
	}
	return t.countLocked()
}

func (t *tracker) count() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.countLocked()
}

func (t *tracker) countLocked() int {
	n := 0
	for _, c := range t.cells {
		select {
		case <-c.ready:
			if c.created {
				n++
			}
		default:
			n++ // being created
		}
	}
	return n
}

// beginTeardown marks c as being destroyed. It returns false, and the channel to wait on, when a
// teardown is already under way.
func (t *tracker) beginTeardown(c *cell) (chan struct{}, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if c.teardown != nil {
		return c.teardown, false
	}
	c.teardown = make(chan struct{})
	c.destroying = true
	return c.teardown, true
}

func (t *tracker) isDestroying(c *cell) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return c.destroying
}
