package main

import (
	"fmt"
	"image/color"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

type report struct {
	Date, Machine, Runsc string
	N                    int
	Library, Raw         []time.Duration // create -> exit of one trivial cell
	Concurrent           []concurrent
	Memory               memoryReport
}

type concurrent struct {
	Cells        int
	Library, Raw time.Duration // wall time until every cell has exited
}

type memoryReport struct {
	Cells              int
	ShimPSS            int64 // per cell, bytes
	RunscCLIPSS        int64
	SandboxPSS         int64
	LibraryHeapPerCell int64 // the supervisor's own heap per tracked cell
	RawRunscCLIPSS     int64
	RawSandboxPSS      int64
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	i := int(p*float64(len(s)-1) + 0.5)
	return s[i]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func (r report) markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Measured %s on %s with %s (`make bench`).\n\n", r.Date, r.Machine, r.Runsc)
	fmt.Fprintf(&b, "| trivial cell, create → exit (%d runs each, alternating) | library | raw `runsc run` | ratio |\n|---|---|---|---|\n", r.N)
	for _, p := range []struct {
		name string
		q    float64
	}{{"median", 0.5}, {"p95", 0.95}} {
		l, w := percentile(r.Library, p.q), percentile(r.Raw, p.q)
		fmt.Fprintf(&b, "| %s | %s | %s | %.3f |\n", p.name, ms(l), ms(w), float64(l)/float64(w))
	}
	b.WriteString("\n| cells at once | library wall time | raw wall time | ratio |\n|---|---|---|---|\n")
	for _, c := range r.Concurrent {
		fmt.Fprintf(&b, "| %d | %s | %s | %.3f |\n", c.Cells, ms(c.Library), ms(c.Raw), float64(c.Library)/float64(c.Raw))
	}
	m := r.Memory
	fmt.Fprintf(&b, "\n| host memory per running cell (PSS, %d cells) | library | raw `runsc run` |\n|---|---|---|\n", m.Cells)
	fmt.Fprintf(&b, "| sandbox and gofer | %s | %s |\n", mib(m.SandboxPSS), mib(m.RawSandboxPSS))
	fmt.Fprintf(&b, "| `runsc run` CLI process | %s | %s |\n", mib(m.RunscCLIPSS), mib(m.RawRunscCLIPSS))
	fmt.Fprintf(&b, "| shim | %s | — |\n", mib(m.ShimPSS))
	fmt.Fprintf(&b, "| supervisor heap per tracked cell | %.1f KiB | — |\n", float64(m.LibraryHeapPerCell)/1024)
	fmt.Fprintf(&b, "| total | %s | %s |\n", mib(m.SandboxPSS+m.RunscCLIPSS+m.ShimPSS+m.LibraryHeapPerCell), mib(m.RawSandboxPSS+m.RawRunscCLIPSS))
	return b.String()
}

var (
	libColor = color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff}
	rawColor = color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff}
)

// charts writes latency.svg (each single-cell run, library and raw) and concurrency.svg (wall
// time against cells at once).
func (r report) charts(dir string) error {
	p := plot.New()
	p.Title.Text = "Trivial cell, create → exit"
	p.X.Label.Text = "run"
	p.Y.Label.Text = "ms"
	for _, s := range []struct {
		name string
		ds   []time.Duration
		c    color.Color
	}{{"library", r.Library, libColor}, {"raw runsc", r.Raw, rawColor}} {
		pts := make(plotter.XYs, len(s.ds))
		for i, d := range s.ds {
			pts[i] = plotter.XY{X: float64(i + 1), Y: float64(d.Microseconds()) / 1000}
		}
		line, dots, err := plotter.NewLinePoints(pts)
		if err != nil {
			return err
		}
		line.Color, dots.Color = s.c, s.c
		p.Add(line, dots)
		p.Legend.Add(s.name, line)
	}
	p.Y.Min = 0
	if err := p.Save(16*vg.Centimeter, 9*vg.Centimeter, filepath.Join(dir, "latency.svg")); err != nil {
		return err
	}

	q := plot.New()
	q.Title.Text = "Cells at once: wall time until all exited"
	q.X.Label.Text = "cells"
	q.Y.Label.Text = "s"
	for _, s := range []struct {
		name string
		get  func(concurrent) time.Duration
		c    color.Color
	}{{"library", func(c concurrent) time.Duration { return c.Library }, libColor},
		{"raw runsc", func(c concurrent) time.Duration { return c.Raw }, rawColor}} {
		pts := make(plotter.XYs, len(r.Concurrent))
		for i, c := range r.Concurrent {
			pts[i] = plotter.XY{X: float64(c.Cells), Y: s.get(c).Seconds()}
		}
		line, dots, err := plotter.NewLinePoints(pts)
		if err != nil {
			return err
		}
		line.Color, dots.Color = s.c, s.c
		q.Add(line, dots)
		q.Legend.Add(s.name, line)
	}
	q.Y.Min, q.X.Min = 0, 0
	q.Legend.Top, q.Legend.Left = true, true
	return q.Save(16*vg.Centimeter, 9*vg.Centimeter, filepath.Join(dir, "concurrency.svg"))
}
