package gvisor_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// newPoolEnv is a realEnv whose Backend keeps a warm pool of size sandboxes; Close runs at
// cleanup, after the test's cells are destroyed and before the check that nothing is left.
func newPoolEnv(t *testing.T, size int, opts ...gvisor.Option) *realEnv {
	t.Helper()
	e := newRealEnv(t, append([]gvisor.Option{gvisor.WithWarmPool(size)}, opts...)...)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		require.NoError(t, e.b.Close(ctx))
	})
	return e
}

// awaitIdle waits until the pool holds n idle sandboxes.
func (e *realEnv) awaitIdle(n int) {
	e.t.Helper()
	require.Eventually(e.t, func() bool { return e.b.PoolStats().Idle >= n }, 90*time.Second, 10*time.Millisecond,
		"pool: %+v", e.b.PoolStats())
}

// pooled reports whether the cell runs (or ran) in a pool sandbox: its shim.json says so.
func (e *realEnv) pooled(id string) bool {
	e.t.Helper()
	data, err := os.ReadFile(filepath.Join(e.root, id, "shim.json"))
	require.NoError(e.t, err)
	var cfg struct {
		Pool *json.RawMessage `json:"pool"`
	}
	require.NoError(e.t, json.Unmarshal(data, &cfg))
	return cfg.Pool != nil
}

// runPooled runs d in a pool sandbox: it waits for one to be idle first.
func (e *realEnv) runPooled(d *cellos.ExecutionCellDocument) (cellos.ExitStatus, error) {
	e.t.Helper()
	e.awaitIdle(1)
	st, err := e.run(d)
	require.True(e.t, e.pooled(d.Spec.ID), "cell %s did not start in a pool sandbox", d.Spec.ID)
	return st, err
}

func TestPoolSmoke(t *testing.T) {
	t.Parallel()
	e := newPoolEnv(t, 1)
	st, err := e.runPooled(sh("smoke", "echo hello; echo err >&2; exit 3"))
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Code: 3, Reason: cellos.ExitExited}, st)
	assert.Equal(t, "hello\n", e.out("smoke").stdout.String())
	assert.Equal(t, "err\n", e.out("smoke").stderr.String())
	assert.Equal(t, uint64(1), e.b.PoolStats().Pooled)
}
