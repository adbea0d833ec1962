package follow

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/testkit"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type syncBuf = testkit.Buffer

type failing struct{ n int }

func (f *failing) Write(p []byte) (int, error) {
	f.n++
	return 0, fmt.Errorf("broken")
}

func TestFollowAppendsFromAnotherProcess(t *testing.T) {
	dir := t.TempDir()
	out, errp := filepath.Join(dir, "out"), filepath.Join(dir, "err")
	require.NoError(t, os.WriteFile(out, []byte("before\n"), 0o644))
	require.NoError(t, os.WriteFile(errp, nil, 0o644))
	var o, e syncBuf
	broken := &failing{}
	f, err := Start([]Stream{{Path: out, To: &o}, {Path: errp, To: &e}, {Path: out, To: broken}})
	require.NoError(t, err)
	// Live: what another process appends arrives without Stop.
	cmd := exec.Command("sh", "-c", `echo one >> "$1"; echo two >> "$2"`, "sh", out, errp)
	require.NoError(t, cmd.Run())
	require.Eventually(t, func() bool { return o.String() == "before\none\n" && e.String() == "two\n" }, 5*time.Second, 5*time.Millisecond)
	// Stop copies what was written before it.
	var want bytes.Buffer
	want.WriteString("before\none\n")
	fh, err := os.OpenFile(out, os.O_WRONLY|os.O_APPEND, 0)
	require.NoError(t, err)
	for i := range 5000 {
		line := fmt.Sprintf("line %d\n", i)
		_, _ = fh.WriteString(line)
		want.WriteString(line)
	}
	fh.Close()
	f.Stop()
	assert.Equal(t, want.String(), o.String())
	assert.Equal(t, 1, broken.n, "a failing writer is dropped after its first error")
	f.Stop() // idempotent
}

func TestFollowMissingFile(t *testing.T) {
	_, err := Start([]Stream{{Path: filepath.Join(t.TempDir(), "nope"), To: &syncBuf{}}})
	assert.Error(t, err)
}
