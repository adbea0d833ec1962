// Package cgroups manages the library's own cgroups: one directory per cell under a parent named
// "cellos" in every hierarchy, on cgroup v1 or v2.
//
// The library creates the memory and CPU directories of a cell itself and writes the limits
// there before runsc starts. runsc places the sandbox in them but does not own them, so they
// outlive the sandbox: the OOM-kill counter can be read after the cell has exited, and the
// library removes them on Destroy. Directories runsc creates in the other hierarchies are its
// own; Remove takes care of those that a crash left behind.
package cgroups

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/internal/proc"
	"github.com/moby/sys/mountinfo"
)

// Parent is the directory under each hierarchy's root that holds every cell's cgroup.
const Parent = "cellos"

// Manager knows where the hierarchies are mounted.
type Manager struct {
	v2      string            // mount point of the unified hierarchy when the host runs v2 only
	v1      map[string]string // controller -> mount point (v1); "name=systemd" style names included
	mounts  []string          // every v1 mount point, sorted
	mounted bool
}

// Detect reads /proc/self/mountinfo.
func Detect() (*Manager, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseMountinfo(f)
}

// parseMountinfo finds the cgroup hierarchies among the mounts of a mountinfo file.
func parseMountinfo(r io.Reader) (*Manager, error) {
	mounts, err := mountinfo.GetMountsFromReader(r, mountinfo.FSTypeFilter("cgroup", "cgroup2"))
	if err != nil {
		return nil, err
	}
	m := &Manager{v1: map[string]string{}}
	var v2 string
	for _, mi := range mounts {
		switch mi.FSType {
		case "cgroup2":
			if v2 == "" {
				v2 = mi.Mountpoint
			}
		case "cgroup":
			m.mounts = append(m.mounts, mi.Mountpoint)
			for _, opt := range strings.Split(mi.VFSOptions, ",") {
				if opt == "rw" || opt == "ro" || opt == "relatime" || strings.HasPrefix(opt, "release_agent") || opt == "clone_children" || opt == "xattr" {
					continue
				}
				if _, dup := m.v1[opt]; !dup {
					m.v1[opt] = mi.Mountpoint
				}
			}
		}
	}
	slices.Sort(m.mounts)
	if len(m.v1) == 0 && v2 != "" {
		m.v2 = v2
	}
	m.mounted = len(m.mounts) > 0 || m.v2 != ""
	return m, nil
}

// Available reports whether any cgroup hierarchy is mounted.
func (m *Manager) Available() bool { return m.mounted }

// V2 reports whether the host uses the unified hierarchy.
func (m *Manager) V2() bool { return m.v2 != "" }

// Path is the cgroups path of a cell, relative to each hierarchy's root (linux.cgroupsPath).
func Path(id string) string { return "/" + Parent + "/" + id }

// Limits are what a cell's cgroup enforces; zero fields are unlimited.
type Limits struct {
	MemoryBytes int64
	CPUMillis   int64
}

// CPUPeriodMicros is the CFS period CPU quotas are expressed in.
const CPUPeriodMicros = 100_000

// Create makes the cell's memory and CPU cgroups and writes the limits. It fails if any of them
// already exists (another cell, or leftovers that Remove must clean first).
func (m *Manager) Create(id string, l Limits) (err error) {
	var made []string
	defer func() {
		if err != nil {
			for _, d := range slices.Backward(made) {
				_ = os.Remove(d)
			}
		}
	}()
	mkdir := func(dir string) error {
		if err := os.Mkdir(dir, 0o755); err != nil {
			if errors.Is(err, os.ErrExist) {
				return fmt.Errorf("cgroup %s already exists", dir)
			}
			return err
		}
		made = append(made, dir)
		return nil
	}
	if m.v2 != "" {
		parent := filepath.Join(m.v2, Parent)
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return err
		}
		if err := enableControllers(m.v2, parent); err != nil {
			return err
		}
		dir := filepath.Join(parent, id)
		if err := mkdir(dir); err != nil {
			return err
		}
		if l.MemoryBytes > 0 {
			if err := write(dir, "memory.max", strconv.FormatInt(l.MemoryBytes, 10)); err != nil {
				return err
			}
			if exists(filepath.Join(dir, "memory.swap.max")) {
				if err := write(dir, "memory.swap.max", "0"); err != nil {
					return err
				}
			}
		}
		if l.CPUMillis > 0 {
			return write(dir, "cpu.max", fmt.Sprintf("%d %d", l.CPUMillis*CPUPeriodMicros/1000, CPUPeriodMicros))
		}
		return nil
	}
	// cpuacct is the library's too, so the cell's CPU usage can be read after it exited.
	for _, ctl := range []string{"memory", "cpu", "cpuacct"} {
		root, ok := m.v1[ctl]
		if !ok {
			if (ctl == "memory" && l.MemoryBytes > 0) || (ctl == "cpu" && l.CPUMillis > 0) {
				return fmt.Errorf("the %s cgroup controller is not mounted", ctl)
			}
			continue
		}
		parent := filepath.Join(root, Parent)
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return err
		}
		dir := filepath.Join(parent, id)
		if slices.Contains(made, dir) {
			continue // co-mounted controllers (cpu,cpuacct,memory...) share a directory
		}
		if err := mkdir(dir); err != nil {
			return err
		}
	}
	if l.MemoryBytes > 0 {
		dir := filepath.Join(m.v1["memory"], Parent, id)
		v := strconv.FormatInt(l.MemoryBytes, 10)
		if err := write(dir, "memory.limit_in_bytes", v); err != nil {
			return err
		}
		if exists(filepath.Join(dir, "memory.memsw.limit_in_bytes")) {
			if err := write(dir, "memory.memsw.limit_in_bytes", v); err != nil {
				return err
			}
		}
	}
	if l.CPUMillis > 0 {
		dir := filepath.Join(m.v1["cpu"], Parent, id)
		if err := write(dir, "cpu.cfs_period_us", strconv.Itoa(CPUPeriodMicros)); err != nil {
			return err
		}
		if err := write(dir, "cpu.cfs_quota_us", strconv.FormatInt(l.CPUMillis*CPUPeriodMicros/1000, 10)); err != nil {
			return err
		}
	}
	return nil
}

func enableControllers(root, parent string) error {
	for _, dir := range []string{root, parent} {
		if err := write(dir, "cgroup.subtree_control", "+memory +cpu"); err != nil {
			return fmt.Errorf("enabling memory and cpu controllers in %s: %w", dir, err)
		}
	}
	return nil
}

func write(dir, file, value string) error {
	err := os.WriteFile(filepath.Join(dir, file), []byte(value), 0o644)
	if err != nil {
		return fmt.Errorf("writing %q to %s: %w", value, filepath.Join(dir, file), err)
	}
	return nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// CPUAcctDir is the cell's CPU accounting directory (cpuacct on v1, the cell's directory on v2),
// "" when there is none.
func (m *Manager) CPUAcctDir(id string) string {
	if m.v2 != "" {
		return filepath.Join(m.v2, Parent, id)
	}
	if root, ok := m.v1["cpuacct"]; ok {
		return filepath.Join(root, Parent, id)
	}
	return ""
}

// MemoryDir is the cell's memory cgroup directory, "" when there is no memory hierarchy.
func (m *Manager) MemoryDir(id string) string {
	if m.v2 != "" {
		return filepath.Join(m.v2, Parent, id)
	}
	if root, ok := m.v1["memory"]; ok {
		return filepath.Join(root, Parent, id)
	}
	return ""
}

// OOMKills reads how many processes the kernel's OOM killer killed in the memory cgroup dir.
func OOMKills(memoryDir string) (int64, error) {
	for _, file := range []string{"memory.oom_control", "memory.events"} {
		data, err := os.ReadFile(filepath.Join(memoryDir, file))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return 0, err
		}
		for line := range strings.Lines(string(data)) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "oom_kill "); ok {
				return strconv.ParseInt(v, 10, 64)
			}
		}
		return 0, nil
	}
	return 0, fmt.Errorf("no OOM counter in %s", memoryDir)
}

// Dirs lists the cell's cgroup directories that exist, in every hierarchy.
func (m *Manager) Dirs(id string) []string {
	var out []string
	roots := m.mounts
	if m.v2 != "" {
		roots = []string{m.v2}
	}
	for _, root := range roots {
		dir := filepath.Join(root, Parent, id)
		if exists(dir) {
			out = append(out, dir)
		}
	}
	return out
}

// Remove deletes the cell's cgroup directories in every hierarchy, children first. Processes
// still inside are killed first. It returns the directories it could not remove.
func (m *Manager) Remove(id string, timeout time.Duration) ([]string, error) {
	var errs []error
	for _, dir := range m.Dirs(id) {
		if err := removeTree(dir, timeout); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return m.Dirs(id), errors.Join(errs...)
	}
	return nil, nil
}

func removeTree(dir string, timeout time.Duration) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeTree(filepath.Join(dir, e.Name()), timeout); err != nil {
				return err
			}
		}
	}
	deadline := time.Now().Add(timeout)
	for delay := time.Millisecond; ; delay = min(delay*2, 50*time.Millisecond) {
		err := syscall.Rmdir(dir)
		if err == nil || errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("removing cgroup %s: %w", dir, err)
		}
		killProcs(dir)
		time.Sleep(delay)
	}
}

// killProcs SIGKILLs the processes left in a cgroup so it can be removed. Each is signalled
// through a pidfd opened after its pid was read and checked to be in the cgroup still, so a pid
// reused by another process meanwhile is never signalled.
func killProcs(dir string) {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(data)) {
		pid, err := strconv.Atoi(f)
		if err != nil || pid <= 1 {
			continue
		}
		h, err := proc.Open(pid)
		if err != nil {
			continue
		}
		if inCgroup(pid, dir) {
			_ = h.Signal(unix.SIGKILL)
		}
		_ = h.Close()
	}
}

// inCgroup reports whether the process pid is a member of the cgroup directory dir.
func inCgroup(pid int, dir string) bool {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return false
	}
	return slices.Contains(strings.Fields(string(data)), strconv.Itoa(pid))
}
