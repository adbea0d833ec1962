package proc

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ticksPerSecond is USER_HZ, the unit of the CPU times in /proc/<pid>/stat: 100 on every Linux
// architecture Go supports (the kernel converts to it whatever its internal HZ).
const ticksPerSecond = 100

// Descendants lists the processes below pid (not pid itself), parents before their children.
// Go programs fork from any thread, so the children of every thread are collected.
func Descendants(pid int) []int {
	var out []int
	seen := map[int]bool{pid: true}
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", p))
		for _, t := range tasks {
			data, err := os.ReadFile(t)
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(data)) {
				child, err := strconv.Atoi(f)
				if err != nil || seen[child] {
					continue
				}
				seen[child] = true
				out = append(out, child)
				queue = append(queue, child)
			}
		}
	}
	return out
}

// Stat is what the library reads of /proc/<pid>/stat.
type Stat struct {
	State   byte   // R, S, D, Z, X, ...
	PPid    int    // parent
	Session int    // session id: the pid of the session leader
	Start   uint64 // start time in clock ticks since boot: with the pid, it names one process
	Ticks   uint64 // CPU time in clock ticks: user and system, its own and its reaped children's
}

// ReadStat parses /proc/<pid>/stat.
func ReadStat(pid int) (Stat, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return Stat{}, err
	}
	return parseStat(data)
}

func parseStat(data []byte) (Stat, error) {
	// The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return Stat{}, fmt.Errorf("malformed stat line")
	}
	fields := strings.Fields(string(data[i+1:]))
	if len(fields) < 20 || len(fields[0]) != 1 {
		return Stat{}, fmt.Errorf("malformed stat line")
	}
	st := Stat{State: fields[0][0]}
	ppid, err1 := strconv.Atoi(fields[1])    // ppid (field 4)
	session, err2 := strconv.Atoi(fields[3]) // session (field 6)
	if err1 != nil || err2 != nil {
		return Stat{}, fmt.Errorf("malformed stat line")
	}
	st.PPid, st.Session = ppid, session
	for _, f := range fields[11:15] { // utime, stime, cutime, cstime (fields 14-17)
		n, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return Stat{}, fmt.Errorf("malformed stat line: %w", err)
		}
		st.Ticks += n
	}
	start, err := strconv.ParseUint(fields[19], 10, 64) // starttime (field 22)
	if err != nil {
		return Stat{}, fmt.Errorf("malformed stat line: %w", err)
	}
	st.Start = start
	return st, nil
}

// CPUNanos is the CPU time (user and system) pid has used, plus that of the children it has
// reaped, in nanoseconds (10 ms resolution).
func CPUNanos(pid int) (uint64, error) {
	st, err := ReadStat(pid)
	if err != nil {
		return 0, err
	}
	return st.Ticks * (1_000_000_000 / ticksPerSecond), nil
}

// PSSBytes is pid's proportional set size: its resident memory, each page shared with other
// processes counted in proportion (/proc/<pid>/smaps_rollup).
func PSSBytes(pid int) (uint64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Pss:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("malformed /proc/%d/smaps_rollup: %w", pid, err)
			}
			return kb << 10, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, nil // a kernel thread or a zombie: no memory of its own
}
