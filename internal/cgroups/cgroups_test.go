package cgroups

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const v1Separate = `30 22 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:29 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:31 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
`

const v1Comounted = `30 22 0:27 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
31 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
33 30 0:30 / /sys/fs/cgroup/memory rw,nosuid shared:10 - cgroup cgroup rw,memory
`

const v2Only = `25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
`

func TestParseMountinfo(t *testing.T) {
	m, err := parseMountinfo(strings.NewReader(v1Separate))
	require.NoError(t, err)
	assert.False(t, m.V2())
	assert.True(t, m.Available())
	assert.Equal(t, "/sys/fs/cgroup/memory/cellos/x", m.MemoryDir("x"))
	assert.Equal(t, "/sys/fs/cgroup/cpuacct/cellos/x", m.CPUAcctDir("x"))
	assert.Equal(t, "/sys/fs/cgroup/systemd", m.v1["name=systemd"])

	m, err = parseMountinfo(strings.NewReader(v1Comounted))
	require.NoError(t, err)
	assert.Equal(t, "/sys/fs/cgroup/cpu,cpuacct", m.v1["cpu"])
	assert.Equal(t, "/sys/fs/cgroup/cpu,cpuacct/cellos/x", m.CPUAcctDir("x"))

	m, err = parseMountinfo(strings.NewReader(v2Only))
	require.NoError(t, err)
	assert.True(t, m.V2())
	assert.Equal(t, "/sys/fs/cgroup/cellos/x", m.MemoryDir("x"))

	m, err = parseMountinfo(strings.NewReader(""))
	require.NoError(t, err)
	assert.False(t, m.Available())
	_, err = parseMountinfo(strings.NewReader("garbage\n"))
	assert.Error(t, err, "a mountinfo line that is not one")
}

func TestOOMKills(t *testing.T) {
	dir := t.TempDir()
	_, err := OOMKills(dir)
	assert.Error(t, err, "no counter file")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "memory.oom_control"), []byte("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"), 0o644))
	n, err := OOMKills(dir)
	require.NoError(t, err)
	assert.Equal(t, int64(2), n)
	dir2 := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir2, "memory.events"), []byte("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"), 0o644))
	n, err = OOMKills(dir2)
	require.NoError(t, err)
	assert.Equal(t, int64(1), n)
}

// TestCreateRemoveReal works on this host's cgroups (root only).
func TestCreateRemoveReal(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	m, err := Detect()
	require.NoError(t, err)
	if !m.Available() || m.V2() {
		t.Skip("needs cgroup v1 (the machine kind this project runs on)")
	}
	id := "cgtest-" + strconv.Itoa(os.Getpid())
	require.NoError(t, m.Create(id, Limits{MemoryBytes: 64 << 20, CPUMillis: 250}))
	limit, err := os.ReadFile(filepath.Join(m.MemoryDir(id), "memory.limit_in_bytes"))
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(64<<20), strings.TrimSpace(string(limit)))
	quota, err := os.ReadFile(filepath.Join(m.v1["cpu"], Parent, id, "cpu.cfs_quota_us"))
	require.NoError(t, err)
	assert.Equal(t, "25000", strings.TrimSpace(string(quota)))
	assert.Error(t, m.Create(id, Limits{MemoryBytes: 64 << 20}), "an existing cgroup is never reused")
	assert.NotEmpty(t, m.Dirs(id))
	left, err := m.Remove(id, time.Second)
	require.NoError(t, err)
	assert.Empty(t, left)
	assert.Empty(t, m.Dirs(id))
}
