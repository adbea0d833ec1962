package main

// Pool mode (-mode pool): the warm pool against cold starts, for each runsc binary given, in one
// run. For every round it runs the trivial cell through a pooled and a cold Backend of each
// binary, alternately, and measures Create → the first byte of the cell's output at the
// WithOutput writer (and Create → exit); a pooled round starts only once the pool is refilled
// and idle again, so that the refill never competes with a measured cell. Then, per binary: the
// memory and CPU of an idle pool of 10, and 50 Creates at once against a pool of 4.
//
//	go run . -mode pool [-runsc "/usr/bin/runsc .cache/runsc-current/runsc"] [-n 30] [-out results]

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

type poolReport struct {
	Date, Machine string
	N             int
	Runtimes      []*poolRuntime
}

type poolRuntime struct {
	Runsc, Version string

	PoolFirstByte, ColdFirstByte []time.Duration // Create → first byte at the WithOutput writer
	RawExecFirstByte             []time.Duration // raw `runsc exec` into a fresh idle sandbox → first byte at its pipe
	PoolCreate, ColdCreate       []time.Duration // Create's own duration
	PoolExit, ColdExit           []time.Duration // Create → WaitForExit returned

	Idle  idleReport
	Burst burstReport
}

type idleReport struct {
	Sandboxes   int
	FillTime    time.Duration // New → all idle
	KeeperPSS   int64         // per idle sandbox, bytes
	SandboxPSS  int64         // sandbox, gofer (and ptrace stubs), per idle sandbox
	CPUPercent  float64       // of one core, the whole idle pool, over CPUWindow
	CPUWindow   time.Duration
	CloseTime   time.Duration
	LeftAfterCl []string // what Close left (should be nothing)
}

type burstReport struct {
	Cells, PoolSize int
	Pooled, Cold    int
	Failed          []string
	Wall            time.Duration // until every cell had exited
	PooledFirstByte []time.Duration
	ColdFirstByte   []time.Duration
}

// firstBytes records when each cell's first byte of stdout arrived.
type firstBytes struct {
	mu     sync.Mutex
	starts map[string]time.Time
	got    map[string]chan time.Duration
}

func newFirstBytes() *firstBytes {
	return &firstBytes{starts: map[string]time.Time{}, got: map[string]chan time.Duration{}}
}

// expect registers a cell about to be created; the returned channel receives its latency.
func (f *firstBytes) expect(id string) <-chan time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch := make(chan time.Duration, 1)
	f.starts[id], f.got[id] = time.Now(), ch
	return ch
}

func (f *firstBytes) output(id string) (io.Writer, io.Writer) {
	return &firstByteWriter{f: f, id: id}, io.Discard
}

type firstByteWriter struct {
	f    *firstBytes
	id   string
	once sync.Once
}

func (w *firstByteWriter) Write(p []byte) (int, error) {
	w.once.Do(func() {
		now := time.Now()
		w.f.mu.Lock()
		start, ch := w.f.starts[w.id], w.f.got[w.id]
		w.f.mu.Unlock()
		if ch != nil {
			ch <- now.Sub(start)
		}
	})
	return len(p), nil
}

func echoCell(id string) *cellos.ExecutionCellDocument {
	return &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
		Spec: cellos.CellSpec{ID: id, Run: cellos.RunSpec{Argv: []string{"/bin/echo", "hi"}}}}
}

// poolSide is one Backend of the comparison.
type poolSide struct {
	b    *gvisor.Backend
	root string
	fb   *firstBytes
}

func newPoolSide(work, name, runsc string, pool int) (*poolSide, error) {
	s := &poolSide{root: filepath.Join(work, name), fb: newFirstBytes()}
	opts := []gvisor.Option{gvisor.WithBundleRoot(s.root), gvisor.WithRunscPath(runsc), gvisor.WithOutput(s.fb.output)}
	if pool > 0 {
		opts = append(opts, gvisor.WithWarmPool(pool))
	}
	var err error
	s.b, err = gvisor.New(opts...)
	return s, err
}

// awaitPool waits until the pool holds n idle sandboxes and starts none.
func (s *poolSide) awaitPool(n int) error {
	deadline := time.Now().Add(3 * time.Minute)
	for {
		st := s.b.PoolStats()
		if st.Idle >= n && !st.Starting {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the pool did not fill: %+v", st)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// once runs one trivial cell: Create → first byte, Create's duration, Create → exit.
func (s *poolSide) once(id string) (first, create, exit time.Duration, pooled bool, err error) {
	return s.onceKeep(id, nil)
}

// onceKeep is once, calling keep with the cell's bundle after its exit, before Destroy.
func (s *poolSide) onceKeep(id string, keep func(bundle string) error) (first, create, exit time.Duration, pooled bool, err error) {
	ctx := context.Background()
	got := s.fb.expect(id)
	start := time.Now()
	h, err := s.b.Create(ctx, echoCell(id))
	create = time.Since(start)
	if err != nil {
		return 0, 0, 0, false, err
	}
	defer func() {
		if _, derr := s.b.Destroy(ctx, h); err == nil {
			err = derr
		}
	}()
	select {
	case first = <-got:
	case <-time.After(30 * time.Second):
		return 0, 0, 0, false, fmt.Errorf("%s: no output", id)
	}
	st, err := s.b.WaitForExit(ctx, id)
	exit = time.Since(start)
	if err == nil && st.Code != 0 {
		err = fmt.Errorf("%s: %+v", id, st)
	}
	pooled = isPooled(s.root, id)
	if err == nil && keep != nil {
		err = keep(filepath.Join(s.root, id))
	}
	return first, create, exit, pooled, err
}

// rawExec is the reference: `runsc exec` of the same process into a fresh idle sandbox started
// from the same bundle and flags as the library's pool sandboxes, by hand.
type rawExec struct {
	runsc    string
	flags    []string // global flags, without --log
	dir      string   // work directory: state root, sandboxes
	template string   // a pool sandbox's bundle: sandbox.json, rootfs/, process.json
}

// newRawExec copies a pooled cell's bundle (after its exit) as the template.
func newRawExec(work, name string) (*rawExec, func(bundle string) error) {
	r := &rawExec{dir: filepath.Join(work, name)}
	return r, func(bundle string) error {
		var shim struct {
			Runsc struct {
				Path     string
				Platform string
				Rootless bool
				Extra    []string
			} `json:"runsc"`
			Flags struct {
				Overlay string
			} `json:"flags"`
		}
		data, err := os.ReadFile(filepath.Join(bundle, "shim.json"))
		if err != nil {
			return err
		}
		if err := json.Unmarshal(data, &shim); err != nil {
			return err
		}
		r.runsc = shim.Runsc.Path
		r.flags = []string{"--root", filepath.Join(r.dir, ".runsc")}
		if shim.Runsc.Rootless {
			r.flags = append(r.flags, "--rootless")
		}
		if shim.Runsc.Platform != "" {
			r.flags = append(r.flags, "--platform="+shim.Runsc.Platform)
		}
		r.flags = append(r.flags, "--network=none", "--ignore-cgroups")
		if shim.Flags.Overlay != "" {
			r.flags = append(r.flags, "--overlay2="+shim.Flags.Overlay)
		}
		r.flags = append(r.flags, shim.Runsc.Extra...)
		r.template = filepath.Join(r.dir, "template")
		if err := os.MkdirAll(r.dir, 0o711); err != nil {
			return err
		}
		if err := os.Mkdir(r.template, 0o700); err != nil {
			return err
		}
		for _, f := range []string{"sandbox.json", "process.json", "rootfs"} {
			if out, err := exec.Command("cp", "-a", filepath.Join(bundle, f), r.template).CombinedOutput(); err != nil {
				return fmt.Errorf("cp: %v: %s", err, out)
			}
		}
		return nil
	}
}

// once starts a fresh idle sandbox (not timed), then times runsc exec of the process until its
// first byte, then deletes the sandbox (not timed).
func (r *rawExec) once(id string) (time.Duration, error) {
	dir := filepath.Join(r.dir, id)
	if out, err := exec.Command("cp", "-a", r.template, dir).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("cp: %v: %s", err, out)
	}
	defer os.RemoveAll(dir)
	if err := os.Rename(filepath.Join(dir, "sandbox.json"), filepath.Join(dir, "config.json")); err != nil {
		return 0, err
	}
	runscID := "cellbench-raw-" + id
	start := exec.Command(r.runsc, append(slices.Clone(r.flags), "--log", filepath.Join(dir, "sandbox.log"), "--log-format=json",
		"run", "--detach", "--bundle", dir, runscID)...)
	if err := start.Run(); err != nil { // stdio /dev/null: the sandbox inherits it
		data, _ := os.ReadFile(filepath.Join(dir, "sandbox.log"))
		return 0, fmt.Errorf("raw runsc run --detach: %v: %s", err, data)
	}
	defer func() {
		_ = exec.Command(r.runsc, "--root", filepath.Join(r.dir, ".runsc"), "delete", "--force", runscID).Run()
	}()
	cmd := exec.Command(r.runsc, append(slices.Clone(r.flags), "--log", filepath.Join(dir, "exec.log"), "--log-format=json",
		"exec", "--process", filepath.Join(dir, "process.json"), runscID)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	var b [1]byte
	_, rerr := out.Read(b[:])
	d := time.Since(t0)
	_, _ = io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil || rerr != nil {
		data, _ := os.ReadFile(filepath.Join(dir, "exec.log"))
		return 0, fmt.Errorf("raw runsc exec: %v %v: %s", err, rerr, data)
	}
	return d, nil
}

func isPooled(root, id string) bool {
	data, err := os.ReadFile(filepath.Join(root, id, "shim.json"))
	var cfg struct {
		Pool json.RawMessage `json:"pool"`
	}
	return err == nil && json.Unmarshal(data, &cfg) == nil && len(cfg.Pool) > 0
}

func runPool(n int, runscs []string, outDir string) error {
	os.Unsetenv(gvisor.EnvRunscBin) // each Backend uses the binary it names
	os.Unsetenv(gvisor.EnvBundleRoot)
	work, err := os.MkdirTemp("", "cellbench-pool-")
	if err != nil {
		return err
	}
	defer removeWork(work)
	host, _ := os.Hostname()
	r := poolReport{Date: time.Now().UTC().Format("2006-01-02 15:04 UTC"),
		Machine: fmt.Sprintf("%s, %d CPUs, %s", host, runtime.NumCPU(), kernel()), N: n}
	type pair struct {
		rt         *poolRuntime
		pool, cold *poolSide
		raw        *rawExec
	}
	var pairs []pair
	for i, bin := range runscs {
		path, err := exec.LookPath(bin)
		if err != nil {
			return err
		}
		if path, err = filepath.Abs(path); err != nil {
			return err
		}
		version, _ := exec.Command(path, "--version").Output()
		rt := &poolRuntime{Runsc: path, Version: strings.TrimSpace(strings.SplitN(string(version), "\n", 2)[0])}
		pool, err := newPoolSide(work, fmt.Sprintf("pool-%d", i), path, 1)
		if err != nil {
			return err
		}
		cold, err := newPoolSide(work, fmt.Sprintf("cold-%d", i), path, 0)
		if err != nil {
			return err
		}
		defer pool.b.Close(context.Background())
		pairs = append(pairs, pair{rt: rt, pool: pool, cold: cold})
		r.Runtimes = append(r.Runtimes, rt)
	}
	// A warm-up cell each: the first use of a binary probes it. The pooled one is the raw
	// reference's template.
	for i, p := range pairs {
		if err := p.pool.awaitPool(1); err != nil {
			return err
		}
		raw, keep := newRawExec(work, fmt.Sprintf("raw-%d", i))
		if _, _, _, _, err := p.pool.onceKeep("warmup", keep); err != nil {
			return err
		}
		pairs[i].raw = raw
		if _, _, _, _, err := p.cold.once("warmup"); err != nil {
			return err
		}
	}
	fmt.Fprintf(os.Stderr, "Create → first byte, %d rounds, pooled and cold alternately, %d runsc\n", n, len(pairs))
	for i := range n {
		for _, p := range pairs {
			if err := p.pool.awaitPool(1); err != nil {
				return err
			}
			first, create, exit, pooled, err := p.pool.once(fmt.Sprintf("pool-%d", i))
			if err != nil {
				return err
			}
			if !pooled {
				return fmt.Errorf("round %d: the cell did not start in the pool", i)
			}
			p.rt.PoolFirstByte = append(p.rt.PoolFirstByte, first)
			p.rt.PoolCreate = append(p.rt.PoolCreate, create)
			p.rt.PoolExit = append(p.rt.PoolExit, exit)
			if err := p.pool.awaitPool(1); err != nil { // the refill must not compete with the cold cell
				return err
			}
			first, create, exit, _, err = p.cold.once(fmt.Sprintf("cold-%d", i))
			if err != nil {
				return err
			}
			p.rt.ColdFirstByte = append(p.rt.ColdFirstByte, first)
			p.rt.ColdCreate = append(p.rt.ColdCreate, create)
			p.rt.ColdExit = append(p.rt.ColdExit, exit)
			raw, err := p.raw.once(fmt.Sprintf("%d", i))
			if err != nil {
				return err
			}
			p.rt.RawExecFirstByte = append(p.rt.RawExecFirstByte, raw)
		}
	}
	for _, p := range pairs {
		if err := p.pool.b.Close(context.Background()); err != nil {
			return err
		}
	}
	for i, p := range pairs {
		fmt.Fprintf(os.Stderr, "%s: idle pool of 10\n", p.rt.Runsc)
		if p.rt.Idle, err = idlePool(work, fmt.Sprintf("idle-%d", i), p.rt.Runsc, 10); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "%s: 50 Creates at once, pool of 4\n", p.rt.Runsc)
		if p.rt.Burst, err = burst(work, fmt.Sprintf("burst-%d", i), p.rt.Runsc, 50, 4); err != nil {
			return err
		}
	}
	return writeReport(outDir, "pool", r.markdown(), r)
}

// idlePool fills a pool of k and measures what it costs while idle, then closes it.
func idlePool(work, name, runsc string, k int) (idleReport, error) {
	rep := idleReport{Sandboxes: k, CPUWindow: 10 * time.Second}
	start := time.Now()
	s, err := newPoolSide(work, name, runsc, k)
	if err != nil {
		return rep, err
	}
	if err := s.awaitPool(k); err != nil {
		return rep, err
	}
	rep.FillTime = time.Since(start)
	time.Sleep(2 * time.Second) // let the sandboxes settle
	procs := poolProcesses(s.root)
	var keeper, sandbox int64
	for _, p := range procs {
		if p.keeper {
			keeper += pssOf(p.dir)
		} else {
			sandbox += pssOf(p.dir)
		}
	}
	rep.KeeperPSS, rep.SandboxPSS = keeper/int64(k), sandbox/int64(k)
	before := cpuTicks(procs)
	time.Sleep(rep.CPUWindow)
	after := cpuTicks(procs)
	rep.CPUPercent = float64(after-before) / 100 / rep.CPUWindow.Seconds() * 100 // ticks are 1/100 s
	start = time.Now()
	if err := s.b.Close(context.Background()); err != nil {
		return rep, err
	}
	rep.CloseTime = time.Since(start)
	for _, p := range poolProcesses(s.root) {
		rep.LeftAfterCl = append(rep.LeftAfterCl, "process "+p.dir)
	}
	if entries, _ := os.ReadDir(s.root); len(entries) > 1 {
		for _, e := range entries {
			if e.Name() != ".runsc" {
				rep.LeftAfterCl = append(rep.LeftAfterCl, "entry "+e.Name())
			}
		}
	}
	return rep, nil
}

type poolProc struct {
	dir    string // /proc/<pid>
	keeper bool
}

// poolProcesses lists the host processes serving the pool of a bundle root: keepers, sandboxes,
// gofers (and their ptrace stubs).
func poolProcesses(root string) []poolProc {
	var out []poolProc
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		data, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(data, []byte(root)) {
			continue
		}
		out = append(out, poolProc{dir: filepath.Dir(p), keeper: bytes.HasPrefix(data, []byte("cellos-gvisor-pool\x00"))})
	}
	return out
}

// cpuTicks sums the user and system time of the processes (and their reaped children).
func cpuTicks(procs []poolProc) int64 {
	var sum int64
	for _, p := range procs {
		data, err := os.ReadFile(filepath.Join(p.dir, "stat"))
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(data, ')')
		f := strings.Fields(string(data[i+1:]))
		for _, s := range f[11:15] {
			n, _ := strconv.ParseInt(s, 10, 64)
			sum += n
		}
	}
	return sum
}

// burst creates c trivial cells at once against a full pool of size.
func burst(work, name, runsc string, c, size int) (burstReport, error) {
	rep := burstReport{Cells: c, PoolSize: size}
	s, err := newPoolSide(work, name, runsc, size)
	if err != nil {
		return rep, err
	}
	defer s.b.Close(context.Background())
	if err := s.awaitPool(size); err != nil {
		return rep, err
	}
	type result struct {
		id     string
		first  time.Duration
		pooled bool
		err    error
	}
	results := make(chan result, c)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("burst-%d", i)
			got := s.fb.expect(id)
			res := result{id: id}
			if _, res.err = s.b.Create(context.Background(), echoCell(id)); res.err == nil {
				select {
				case res.first = <-got:
				case <-time.After(2 * time.Minute):
					res.err = errors.New("no output")
				}
				var st cellos.ExitStatus
				if st, res.err = s.b.WaitForExit(context.Background(), id); res.err == nil && st.Code != 0 {
					res.err = fmt.Errorf("status %+v", st)
				}
				res.pooled = isPooled(s.root, id)
			}
			results <- res
		}()
	}
	wg.Wait()
	rep.Wall = time.Since(start)
	close(results)
	for res := range results {
		switch {
		case res.err != nil:
			rep.Failed = append(rep.Failed, res.id+": "+res.err.Error())
		case res.pooled:
			rep.Pooled++
			rep.PooledFirstByte = append(rep.PooledFirstByte, res.first)
		default:
			rep.Cold++
			rep.ColdFirstByte = append(rep.ColdFirstByte, res.first)
		}
		_, _ = s.b.Destroy(context.Background(), cellos.CellHandle{CellID: res.id})
	}
	return rep, nil
}

func (r poolReport) markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Measured %s on %s (`make bench`, pool mode).\n\n", r.Date, r.Machine)
	fmt.Fprintf(&b, "| trivial cell (`/bin/echo hi`), %d rounds, alternating | Create → first byte p50 | p95 | Create returns p50 | Create → exit p50 |\n|---|---|---|---|---|\n", r.N)
	for _, rt := range r.Runtimes {
		for _, side := range []struct {
			name                string
			first, create, exit []time.Duration
		}{{"warm pool", rt.PoolFirstByte, rt.PoolCreate, rt.PoolExit}, {"cold", rt.ColdFirstByte, rt.ColdCreate, rt.ColdExit}} {
			fmt.Fprintf(&b, "| %s, %s | %s | %s | %s | %s |\n", rt.Version, side.name, ms(percentile(side.first, 0.5)),
				ms(percentile(side.first, 0.95)), ms(percentile(side.create, 0.5)), ms(percentile(side.exit, 0.5)))
		}
		fmt.Fprintf(&b, "| %s, raw `runsc exec` into an idle sandbox (reference) | %s | %s | — | — |\n", rt.Version,
			ms(percentile(rt.RawExecFirstByte, 0.5)), ms(percentile(rt.RawExecFirstByte, 0.95)))
	}
	b.WriteString("\n| idle pool of 10 | fill time | host memory per idle sandbox (PSS): sandbox + gofer | keeper | CPU, whole pool | Close |\n|---|---|---|---|---|---|\n")
	for _, rt := range r.Runtimes {
		i := rt.Idle
		left := ""
		if len(i.LeftAfterCl) > 0 {
			left = fmt.Sprintf(" (left: %s)", strings.Join(i.LeftAfterCl, ", "))
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %.2f %% of a core over %s | %s%s |\n", rt.Version, ms(i.FillTime), mib(i.SandboxPSS), mib(i.KeeperPSS),
			i.CPUPercent, i.CPUWindow, ms(i.CloseTime), left)
	}
	b.WriteString("\n| 50 Creates at once, pool of 4 | succeeded | pooled | cold | wall time until all exited | first byte p50 pooled | first byte p50 cold |\n|---|---|---|---|---|---|---|\n")
	for _, rt := range r.Runtimes {
		u := rt.Burst
		fmt.Fprintf(&b, "| %s | %d of %d | %d | %d | %s | %s | %s |\n", rt.Version, u.Cells-len(u.Failed), u.Cells, u.Pooled, u.Cold,
			ms(u.Wall), ms(percentile(u.PooledFirstByte, 0.5)), ms(percentile(u.ColdFirstByte, 0.5)))
		for _, f := range u.Failed {
			fmt.Fprintf(&b, "\nfailed: %s\n", f)
		}
	}
	return b.String()
}

// runscList splits the -runsc flag: binaries separated by spaces or commas.
func runscList(s string) []string {
	return slices.DeleteFunc(strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }), func(s string) bool { return s == "" })
}
