package gvisor

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/pool"
	"github.com/cellos/cellos-host-gvisor/internal/runsc"
)

// A cell's runsc id is a fixed-width digest of the bundle root and the cell id: the same for the
// same pair, another for another root.
func TestRunscID(t *testing.T) {
	a := RunscID("/var/lib/cellos", "build-42")
	assert.Equal(t, a, RunscID("/var/lib/cellos", "build-42"))
	assert.NotEqual(t, a, RunscID("/var/lib/other", "build-42"), "two roots never share an id")
	assert.Len(t, a, len(runsc.IDPrefix)+24)
	assert.True(t, strings.HasPrefix(a, runsc.IDPrefix))
	for _, id := range []string{"a", "a-1", "a-10", strings.Repeat("x", 64)} {
		assert.Len(t, RunscID("/r", id), len(a), id)
	}
}

// Pool sandboxes' runsc ids and cells' ids are never prefixes of one another (runsc matches ids
// by prefix), and a pool directory's name is never a cell id.
func TestPoolIDsNeverPrefixes(t *testing.T) {
	poolID := runsc.PoolIDPrefix + strings.Repeat("0", runsc.PoolNameLen)
	assert.True(t, runsc.IsPoolID(poolID))
	for _, id := range []string{"a", "cell", "pool", "0", strings.Repeat("f", 64)} {
		cell := RunscID("/var/lib/cellos", id)
		assert.False(t, strings.HasPrefix(poolID, cell), id)
		assert.False(t, strings.HasPrefix(cell, poolID), id)
		assert.False(t, runsc.IsPoolID(cell), id)
	}
	assert.False(t, cellos.ValidID(pool.DirName))
	assert.False(t, runsc.IsPoolID(runsc.PoolIDPrefix+"0123"), "short")
	assert.False(t, runsc.IsPoolID(runsc.PoolIDPrefix+strings.Repeat("G", runsc.PoolNameLen)), "not hex")
}

func TestStateIDsFromFileNames(t *testing.T) {
	dir := t.TempDir()
	cold := RunscID("/b", "c1")
	poolID := runsc.PoolIDPrefix + "0123456789abcdef01234567"
	for _, f := range []string{cold + ".state", cold + ".lock", poolID + "_sandbox:" + poolID + ".lock", runsc.NullNetNS} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), nil, 0o600))
	}
	r := &runsc.Runsc{Root: dir}
	ids, other := r.StateIDs()
	assert.Equal(t, map[string]bool{cold: true, poolID: true}, ids)
	assert.False(t, other)

	for _, f := range []string{"foreign.state", "cellos-short.state", "cellos-" + "zz23456789abcdef01234567.state"} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), nil, 0o600))
		_, other = r.StateIDs()
		assert.True(t, other, f)
		require.NoError(t, os.Remove(filepath.Join(dir, f)))
	}

	// Lone locks of a poolID sandbox go without runsc (there is none here to call).
	require.NoError(t, pool.RemoveSandbox(&runsc.Runsc{Root: dir}, poolID))
	ids, _ = r.StateIDs()
	assert.Equal(t, map[string]bool{cold: true}, ids)
}
