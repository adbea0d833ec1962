package bundle

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/internal/owned"
)

func needRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("overlay mounts need root")
	}
}

// layerDirs makes n layer directories under parent, layer i holding "f" = "i" and "only-i".
func layerDirs(t *testing.T, parent string, n int, name func(int) string) []string {
	var out []string
	for i := range n {
		d := filepath.Join(parent, name(i))
		require.NoError(t, os.MkdirAll(d, 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(d, "f"), []byte(fmt.Sprint(i)), 0o644))
		require.NoError(t, os.WriteFile(filepath.Join(d, fmt.Sprintf("only-%d", i)), nil, 0o644))
		out = append(out, d)
	}
	return out
}

func mountedBundle(t *testing.T, layers []string) string {
	t.Helper()
	root, err := owned.Ensure(filepath.Join(t.TempDir(), "b"), 0o700)
	require.NoError(t, err)
	t.Cleanup(func() {
		require.NoError(t, Remove(root, "c"))
		root.Close()
	})
	dir, err := root.Mkdir("c", 0o700)
	require.NoError(t, err)
	defer dir.Close()
	rfs, err := dir.Mkdir(Rootfs, 0o755)
	require.NoError(t, err)
	rfs.Close()
	require.NoError(t, MountLayers(dir, layers))
	return filepath.Join(dir.Path(), Rootfs)
}

func TestMountLayersStacksLowestFirst(t *testing.T) {
	needRoot(t)
	layers := layerDirs(t, t.TempDir(), 3, func(i int) string { return fmt.Sprint("l", i) })
	// A whiteout in the top layer hides the lowest layer's file.
	require.NoError(t, unix.Mknod(filepath.Join(layers[2], "only-0"), unix.S_IFCHR, 0))
	rootfs := mountedBundle(t, layers)
	got, err := os.ReadFile(filepath.Join(rootfs, "f"))
	require.NoError(t, err)
	require.Equal(t, "2", string(got), "the last layer is the uppermost")
	require.NoFileExists(t, filepath.Join(rootfs, "only-0"))
	require.FileExists(t, filepath.Join(rootfs, "only-1"))
	// Writes land in the bundle's upper layer, never in a layer.
	require.NoError(t, os.WriteFile(filepath.Join(rootfs, "new"), nil, 0o644))
	require.NoFileExists(t, filepath.Join(layers[2], "new"))
}

func TestMountLayersBeyondOnePageOfOptions(t *testing.T) {
	needRoot(t)
	long := strings.Repeat("x", 200)
	layers := layerDirs(t, t.TempDir(), 30, func(i int) string { return fmt.Sprintf("%s-%02d", long, i) })
	rootfs := mountedBundle(t, layers)
	got, err := os.ReadFile(filepath.Join(rootfs, "f"))
	require.NoError(t, err)
	require.Equal(t, "29", string(got))
	require.FileExists(t, filepath.Join(rootfs, "only-0"))
}

func TestMountLayersPathsMountCannotExpress(t *testing.T) {
	needRoot(t)
	layers := layerDirs(t, t.TempDir(), 2, func(i int) string { return fmt.Sprintf("a:b,c\\%d", i) })
	rootfs := mountedBundle(t, layers)
	got, err := os.ReadFile(filepath.Join(rootfs, "f"))
	require.NoError(t, err)
	require.Equal(t, "1", string(got))
}

func TestMountLayersNeedsOne(t *testing.T) {
	root, err := owned.Ensure(filepath.Join(t.TempDir(), "b"), 0o700)
	require.NoError(t, err)
	defer root.Close()
	require.ErrorContains(t, MountLayers(root, nil), "at least one layer")
}
