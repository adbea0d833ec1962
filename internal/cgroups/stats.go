package cgroups

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Usage is what a cell's cgroups account: everything the host charges to the cell's sandbox.
type Usage struct {
	MemoryBytes uint64 // memory charged to the cell (anonymous, page cache, the sandbox's memory file)
	CPUNanos    uint64 // CPU time of the cell's processes since the cgroup was made
}

// Usage reads the cell's memory and CPU accounting. It fails when the cell has no cgroups.
func (m *Manager) Usage(id string) (Usage, error) {
	var u Usage
	var err error
	if m.v2 != "" {
		dir := filepath.Join(m.v2, Parent, id)
		if u.MemoryBytes, err = readUint(dir, "memory.current"); err != nil {
			return u, err
		}
		usec, err := readKeyed(dir, "cpu.stat", "usage_usec")
		u.CPUNanos = usec * 1000
		return u, err
	}
	if dir := m.MemoryDir(id); dir != "" {
		if u.MemoryBytes, err = readUint(dir, "memory.usage_in_bytes"); err != nil {
			return u, err
		}
	}
	if dir := m.CPUAcctDir(id); dir != "" {
		if u.CPUNanos, err = readUint(dir, "cpuacct.usage"); err != nil {
			return u, err
		}
	}
	return u, nil
}

func readUint(dir, file string) (uint64, error) {
	data, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", filepath.Join(dir, file), err)
	}
	return v, nil
}

func readKeyed(dir, file, key string) (uint64, error) {
	data, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), key+" "); ok {
			return strconv.ParseUint(v, 10, 64)
		}
	}
	return 0, fmt.Errorf("%s has no %q", filepath.Join(dir, file), key)
}
