package gvisor

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func trackedCell(id string, created bool) *cell {
	c := &cell{id: id, ready: make(chan struct{}), exited: make(chan struct{})}
	c.created = created
	close(c.ready)
	return c
}

// An id is claimed by one operation at a time; a release by another entry of the same id does
// not drop the current one; only created cells count.
func TestTrackerClaimRelease(t *testing.T) {
	tr := newTracker()
	a := trackedCell("a", true)
	require.Nil(t, tr.claim(a))
	assert.Same(t, a, tr.claim(trackedCell("a", true)), "the id is taken")
	assert.Same(t, a, tr.get("a"))
	placeholder := trackedCell("b", false)
	require.Nil(t, tr.claim(placeholder))
	assert.Equal(t, 1, tr.count(), "a placeholder is no cell")
	being := &cell{id: "c", ready: make(chan struct{})}
	require.Nil(t, tr.claim(being))
	assert.Equal(t, 2, tr.count(), "a cell being created counts")
	assert.Equal(t, 2, tr.release(trackedCell("a", true)), "another entry of the id releases nothing")
	assert.Same(t, a, tr.get("a"))
	assert.Equal(t, 1, tr.release(a))
	assert.Nil(t, tr.get("a"))
}

// The first beginTeardown wins; later ones get the channel that closes when it has finished.
func TestTrackerTeardownOnce(t *testing.T) {
	tr := newTracker()
	c := trackedCell("x", true)
	require.Nil(t, tr.claim(c))
	var firsts int
	var mu sync.Mutex
	var wg sync.WaitGroup
	chans := make([]chan struct{}, 8)
	for i := range chans {
		wg.Add(1)
		go func() {
			defer wg.Done()
			done, first := tr.beginTeardown(c)
			chans[i] = done
			if first {
				mu.Lock()
				firsts++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	assert.Equal(t, 1, firsts)
	for _, ch := range chans {
		assert.Equal(t, chans[0], ch)
	}
	assert.True(t, tr.isDestroying(c))
}
