package gvisor

import (
	"encoding/json"
	"fmt"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/internal/owned"
)

// readJSON reads a bundle file by path, for tests that look at what the library wrote.
func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// ownedDir opens (making it) a directory of the library's for a test.
func ownedDir(t testing.TB, path string) *owned.Dir {
	t.Helper()
	d, err := owned.Ensure(path, 0o700)
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	return d
}
