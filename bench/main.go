// Command cellbench measures what the library costs on top of runsc: a trivial cell run through
// the library and the same bundle run through raw `runsc run` with the same flags, alternately;
// then 10, 50 and 100 cells at once through both; then host memory per running cell. It prints a
// Markdown table and writes it, with charts, to the output directory. With -mode pool it measures
// the warm pool against cold starts instead (pool.go).
//
//	go run . [-n 20] [-concurrency 10,50,100] [-resident 10] [-out results]
//	go run . -mode pool [-runsc "BIN BIN..."] [-n 30] [-out results]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
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
	"syscall"
	"time"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

func main() {
	n := flag.Int("n", 20, "single-cell runs per side")
	conc := flag.String("concurrency", "10,50,100", "cells at once")
	resident := flag.Int("resident", 10, "running cells for the memory measurement")
	out := flag.String("out", "results", "directory for results.md and the charts")
	mode := flag.String("mode", "compare", "compare: library vs raw runsc; pool: warm pool vs cold starts")
	runscs := flag.String("runsc", "runsc", "pool mode: the runsc binaries to measure, separated by spaces or commas")
	spare := flag.Bool("spare", true, "compare mode: the library keeps a spare shim (gvisor.WithSpareShim)")
	limits := flag.Bool("limits", true, "compare mode: cells get the library's default limits (cgroups; raw runsc gets the same config); false: gvisor.WithDefaultResources(gvisor.DefaultResources{})")
	flag.Parse()
	var err error
	switch *mode {
	case "compare":
		err = run(*n, *conc, *resident, *out, *spare, *limits)
	case "pool":
		err = runPool(*n, runscList(*runscs), *out)
	default:
		err = fmt.Errorf("unknown -mode %q", *mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "cellbench:", err)
		os.Exit(1)
	}
}

// trivial is the cell every latency measurement runs.
func trivial(id string) *cellos.ExecutionCellDocument {
	return &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
		Spec: cellos.CellSpec{ID: id, Run: cellos.RunSpec{Argv: []string{"/bin/true"}}}}
}

type bench struct {
	root     string // the library's bundle root
	rawRoot  string // bundles and state of the raw runs
	b        *gvisor.Backend
	runsc    string
	flags    []string // the global flags the library passes runsc, from a kept cell's shim.json
	template string   // a bundle directory to copy for raw runs
}

func run(n int, concList string, resident int, outDir string, spare, limits bool) error {
	work, err := os.MkdirTemp("", "cellbench-")
	if err != nil {
		return err
	}
	defer removeWork(work)
	bn := &bench{root: filepath.Join(work, "lib"), rawRoot: filepath.Join(work, "raw")}
	opts := []gvisor.Option{gvisor.WithBundleRoot(bn.root), gvisor.WithSpareShim(spare)}
	if !limits {
		opts = append(opts, gvisor.WithDefaultResources(gvisor.DefaultResources{}))
	}
	if bn.b, err = gvisor.New(opts...); err != nil {
		return err
	}
	if err := bn.prepareRaw(); err != nil {
		return fmt.Errorf("preparing the raw bundle: %w", err)
	}
	version, _ := exec.Command(bn.runsc, "--version").Output()
	host, _ := os.Hostname()
	r := report{
		Date:    time.Now().UTC().Format("2006-01-02 15:04 UTC"),
		Machine: fmt.Sprintf("%s, %d CPUs, %s", host, runtime.NumCPU(), kernel()),
		Runsc:   strings.TrimSpace(strings.SplitN(string(version), "\n", 2)[0]),
		N:       n,
	}
	fmt.Fprintf(os.Stderr, "single cell, %d runs each, alternating\n", n)
	for i := range 2 * n {
		if i%2 == 0 {
			d, err := bn.libraryOnce(fmt.Sprintf("single-%d", i))
			if err != nil {
				return err
			}
			r.Library = append(r.Library, d)
		} else {
			d, err := bn.rawOnce(fmt.Sprintf("raw-%d", i))
			if err != nil {
				return err
			}
			r.Raw = append(r.Raw, d)
		}
	}
	for _, f := range strings.Split(concList, ",") {
		c, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || c <= 0 {
			return fmt.Errorf("bad concurrency %q", f)
		}
		fmt.Fprintf(os.Stderr, "%d cells at once\n", c)
		raw, err := bn.rawMany(c)
		if err != nil {
			return err
		}
		lib, err := bn.libraryMany(c)
		if err != nil {
			return err
		}
		r.Concurrent = append(r.Concurrent, concurrent{Cells: c, Library: lib, Raw: raw})
	}
	fmt.Fprintf(os.Stderr, "memory of %d running cells\n", resident)
	if r.Memory, err = bn.memory(resident); err != nil {
		return err
	}
	if err := writeReport(outDir, "results", r.markdown(), r); err != nil {
		return err
	}
	return r.charts(outDir)
}

// prepareRaw runs one cell through the library without destroying it, to copy its bundle and the
// runsc flags the library used.
func (bn *bench) prepareRaw() error {
	ctx := context.Background()
	h, err := bn.b.Create(ctx, trivial("template"))
	if err != nil {
		return err
	}
	if _, err := bn.b.WaitForExit(ctx, h.CellID); err != nil {
		return err
	}
	var shim struct {
		Runsc struct {
			Path     string
			Root     string
			Platform string
			Rootless bool
			Extra    []string
		} `json:"runsc"`
		Flags struct {
			IgnoreCgroups bool
			Overlay       string
		} `json:"flags"`
	}
	data, err := os.ReadFile(filepath.Join(bn.root, "template", "shim.json"))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, &shim); err != nil {
		return err
	}
	bn.runsc = shim.Runsc.Path
	bn.flags = []string{"--root", filepath.Join(bn.rawRoot, ".runsc"), "--log", filepath.Join(bn.rawRoot, "runsc.log"), "--log-format=json"}
	if shim.Runsc.Rootless {
		bn.flags = append(bn.flags, "--rootless")
	}
	if shim.Runsc.Platform != "" {
		bn.flags = append(bn.flags, "--platform="+shim.Runsc.Platform)
	}
	bn.flags = append(bn.flags, "--network=none")
	if shim.Flags.IgnoreCgroups {
		bn.flags = append(bn.flags, "--ignore-cgroups")
	}
	if shim.Flags.Overlay != "" {
		bn.flags = append(bn.flags, "--overlay2="+shim.Flags.Overlay)
	}
	bn.flags = append(bn.flags, shim.Runsc.Extra...)
	bn.template = filepath.Join(bn.rawRoot, "template")
	if err := os.MkdirAll(bn.rawRoot, 0o711); err != nil {
		return err
	}
	if err := os.Mkdir(bn.template, 0o700); err != nil {
		return err
	}
	// Everything but the control namespace pin (a mount of the library's cell, not a file).
	copyCmd := fmt.Sprintf("tar -C %q --exclude=./control.netns -cf - . | tar -C %q -xf -", filepath.Join(bn.root, "template"), bn.template)
	if out, err := exec.Command("/bin/sh", "-c", copyCmd).CombinedOutput(); err != nil {
		return fmt.Errorf("copying the template bundle: %v: %s", err, out)
	}
	_, err = bn.b.Destroy(ctx, h)
	return err
}

// libraryOnce measures Create -> WaitForExit of one trivial cell; Destroy is not timed.
func (bn *bench) libraryOnce(id string) (time.Duration, error) {
	ctx := context.Background()
	start := time.Now()
	h, err := bn.b.Create(ctx, trivial(id))
	if err != nil {
		return 0, err
	}
	st, err := bn.b.WaitForExit(ctx, id)
	d := time.Since(start)
	if err == nil && st.Code != 0 {
		err = fmt.Errorf("%s: %+v", id, st)
	}
	if _, derr := bn.b.Destroy(ctx, h); err == nil {
		err = derr
	}
	return d, err
}

// rawOnce measures `runsc run` of the same bundle with the same flags, output read through pipes
// as the library's shim reads it.
func (bn *bench) rawOnce(id string) (time.Duration, error) {
	cmd := exec.Command(bn.runsc, append(slices.Clone(bn.flags), "run", "--bundle", bn.template, "cellbench-"+id)...)
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil {
		data, _ := os.ReadFile(filepath.Join(bn.rawRoot, "runsc.log"))
		return 0, fmt.Errorf("raw runsc: %v: %s", err, data)
	}
	return d, nil
}

func (bn *bench) libraryMany(c int) (time.Duration, error) {
	errs := make(chan error, c)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("many-%d-%d", c, i)
			_, err := bn.b.Create(context.Background(), trivial(id))
			if err == nil {
				var st cellos.ExitStatus
				st, err = bn.b.WaitForExit(context.Background(), id)
				if err == nil && st.Code != 0 {
					err = fmt.Errorf("%s: %+v", id, st)
				}
			}
			errs <- err
		}()
	}
	wg.Wait()
	d := time.Since(start)
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	for i := range c {
		if _, err := bn.b.Destroy(context.Background(), cellos.CellHandle{CellID: fmt.Sprintf("many-%d-%d", c, i)}); err != nil {
			all = append(all, err)
		}
	}
	return d, errors.Join(all...)
}

func (bn *bench) rawMany(c int) (time.Duration, error) {
	errs := make(chan error, c)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.Command(bn.runsc, append(slices.Clone(bn.flags), "run", "--bundle", bn.template, fmt.Sprintf("cellbench-many-%d-%d", c, i))...)
			cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
			errs <- cmd.Run()
		}()
	}
	wg.Wait()
	d := time.Since(start)
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	return d, errors.Join(all...)
}

// memory starts k sleeping cells through each path and reads the proportional set size of every
// host process that serves them.
func (bn *bench) memory(k int) (memoryReport, error) {
	var m memoryReport
	m.Cells = k
	ctx := context.Background()
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	heapBefore := ms.HeapAlloc
	for i := range k {
		d := trivial(fmt.Sprintf("resident-%d", i))
		d.Spec.Run.Argv = []string{"/bin/sleep", "30"}
		if _, err := bn.b.Create(ctx, d); err != nil {
			return m, err
		}
	}
	time.Sleep(2 * time.Second) // let the sandboxes settle
	runtime.GC()
	runtime.ReadMemStats(&ms)
	m.LibraryHeapPerCell = int64(ms.HeapAlloc-heapBefore) / int64(k)
	procs := classify(bn.root)
	m.ShimPSS = procs["shim"] / int64(k)
	m.RunscCLIPSS = procs["runsc"] / int64(k)
	m.SandboxPSS = procs["sandbox"] / int64(k)
	for i := range k {
		if _, err := bn.b.Destroy(ctx, cellos.CellHandle{CellID: fmt.Sprintf("resident-%d", i)}); err != nil {
			return m, err
		}
	}
	// Raw: the same cells through `runsc run`.
	var cmds []*exec.Cmd
	for i := range k {
		cmd := exec.Command(bn.runsc, append(slices.Clone(bn.flags), "run", "--bundle", bn.template+"-sleep", fmt.Sprintf("cellbench-resident-%d", i))...)
		cmds = append(cmds, cmd)
	}
	if err := sleepingTemplate(bn.template, bn.template+"-sleep"); err != nil {
		return m, err
	}
	for _, cmd := range cmds {
		if err := cmd.Start(); err != nil {
			return m, err
		}
	}
	time.Sleep(2 * time.Second)
	raw := classify(bn.template + "-sleep")
	m.RawRunscCLIPSS = raw["runsc"] / int64(k)
	m.RawSandboxPSS = raw["sandbox"] / int64(k)
	for i, cmd := range cmds {
		_ = exec.Command(bn.runsc, append(slices.Clone(bn.flags), "kill", fmt.Sprintf("cellbench-resident-%d", i), "KILL")...).Run()
		_ = cmd.Wait()
	}
	return m, nil
}

// sleepingTemplate copies the trivial bundle with `sleep 30` as the process.
func sleepingTemplate(src, dst string) error {
	if out, err := exec.Command("cp", "-a", src, dst).CombinedOutput(); err != nil {
		return fmt.Errorf("cp: %v: %s", err, out)
	}
	path := filepath.Join(dst, "config.json")
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	data = bytes.Replace(data, []byte(`"/bin/true"`), []byte(`"/bin/sleep", "30"`), 1)
	return os.WriteFile(path, data, 0o644)
}

// classify sums the PSS of the processes of dir: the shims (working in a bundle of dir), the
// runsc CLI processes (`runsc ... run`) and the sandboxes and gofers (their command lines name
// dir).
func classify(dir string) map[string]int64 {
	out := map[string]int64{}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		data, err := os.ReadFile(p)
		cwd, _ := os.Readlink(filepath.Join(filepath.Dir(p), "cwd"))
		if err != nil || (!bytes.Contains(data, []byte(dir)) && !strings.HasPrefix(cwd, dir+"/")) {
			continue
		}
		pss := pssOf(filepath.Dir(p))
		args := strings.Split(string(data), "\x00")
		switch {
		case args[0] == "cellos-gvisor-shim" && strings.HasPrefix(cwd, dir+"/"):
			out["shim"] += pss
		case slices.Contains(args, "run"):
			out["runsc"] += pss
		default:
			out["sandbox"] += pss
		}
	}
	return out
}

// pssOf reads a process's proportional set size in bytes.
func pssOf(procDir string) int64 {
	data, err := os.ReadFile(filepath.Join(procDir, "smaps_rollup"))
	if err != nil {
		return 0
	}
	for l := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(l, "Pss:"); ok {
			kb, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func kernel() string {
	data, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return "Linux " + strings.TrimSpace(string(data))
}

// removeWork removes the benchmark's work directory, unmounting first what runsc left mounted
// in the raw runs' state roots (a current runsc's null-netns).
func removeWork(dir string) {
	data, _ := os.ReadFile("/proc/self/mounts")
	var under []string
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
			under = append(under, f[1])
		}
	}
	for i := len(under) - 1; i >= 0; i-- {
		_ = syscall.Unmount(under[i], syscall.MNT_DETACH)
	}
	_ = os.RemoveAll(dir)
}

// writeReport prints md and writes it to <dir>/<name>.md, and v to <dir>/<name>.json.
func writeReport(dir, name, md string, v any) error {
	fmt.Print(md)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, name+".md"), []byte(md), 0o644); err != nil {
		return err
	}
	data, _ := json.MarshalIndent(v, "", "  ")
	return os.WriteFile(filepath.Join(dir, name+".json"), data, 0o644)
}
