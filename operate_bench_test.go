package gvisor_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// The latency of each operation on a running cell, through the library, against the real runsc:
//
//	go test -run '^$' -bench 'Exec|Signal|PauseResume|Checkpoint|Restore|Stats' -benchtime 20x .

var benchSeq atomic.Int64

// benchID is a cell id no other benchmark run uses (cgroup paths are global on the host).
func benchID(prefix string) string { return fmt.Sprintf("%s-%d", prefix, benchSeq.Add(1)) }

// benchCell creates a cell that runs until destroyed and waits until runsc runs it.
func benchCell(b *testing.B, e *realEnv, d *cellos.ExecutionCellDocument) cellos.CellHandle {
	b.Helper()
	h := e.create(d)
	if _, err := e.b.Stats(context.Background(), h.CellID); err != nil {
		b.Fatal(err)
	}
	return h
}

func BenchmarkExec(b *testing.B) {
	e := newRealEnv(b)
	h := benchCell(b, e, sh(benchID("bench-exec"), "sleep 600"))
	run := cellos.RunSpec{Argv: []string{"/bin/true"}}
	ctx := context.Background()
	b.ResetTimer()
	for range b.N {
		st, err := e.b.Exec(ctx, h.CellID, run, nil, nil)
		if err != nil || st.Code != 0 {
			b.Fatal(st, err)
		}
	}
}

func BenchmarkPauseResume(b *testing.B) {
	e := newRealEnv(b)
	h := benchCell(b, e, sh(benchID("bench-pause"), "while :; do sleep 0.01; done"))
	ctx := context.Background()
	var paused time.Duration
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if err := e.b.Pause(ctx, h.CellID); err != nil {
			b.Fatal(err)
		}
		paused += time.Since(start)
		if err := e.b.Resume(ctx, h.CellID); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(paused)/1e6/float64(b.N), "pause-ms/op")
}

// BenchmarkSignal sends SIGCONT, which a running shell ignores.
func BenchmarkSignal(b *testing.B) {
	e := newRealEnv(b)
	h := benchCell(b, e, sh(benchID("bench-signal"), "sleep 600"))
	ctx := context.Background()
	b.ResetTimer()
	for range b.N {
		if err := e.b.Signal(ctx, h.CellID, syscall.SIGCONT); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkStats(b *testing.B) {
	for _, limits := range []bool{false, true} {
		b.Run(fmt.Sprintf("cgroups=%v", limits), func(b *testing.B) {
			e := newRealEnv(b)
			d := sh(benchID("bench-stats"), "sleep 600")
			if limits {
				d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 256 << 20}
			}
			h := benchCell(b, e, d)
			ctx := context.Background()
			b.ResetTimer()
			for range b.N {
				if _, err := e.b.Stats(ctx, h.CellID); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkCheckpoint(b *testing.B) {
	e := newRealEnv(b)
	ctx := context.Background()
	dir := b.TempDir()
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		h := benchCell(b, e, counterDoc(benchID("bench-ckpt")))
		b.StartTimer()
		if err := e.b.Checkpoint(ctx, h.CellID, filepath.Join(dir, fmt.Sprint(i))); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		e.destroy(h)
		b.StartTimer()
	}
}

// BenchmarkRestore times Restore until the restored cell runs (an Exec of /bin/true answers);
// restore-ms/op is Restore's own return.
func BenchmarkRestore(b *testing.B) {
	e := newRealEnv(b)
	ctx := context.Background()
	image := b.TempDir()
	src := benchCell(b, e, counterDoc(benchID("bench-rst-src")))
	if err := e.b.Checkpoint(ctx, src.CellID, image); err != nil {
		b.Fatal(err)
	}
	run := cellos.RunSpec{Argv: []string{"/bin/true"}}
	var returned time.Duration
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		h, err := e.b.Restore(ctx, counterDoc(benchID("bench-rst")), image)
		if err != nil {
			b.Fatal(err)
		}
		returned += time.Since(start)
		if st, err := e.b.Exec(ctx, h.CellID, run, nil, nil); err != nil || st.Code != 0 {
			b.Fatal(st, err)
		}
		b.StopTimer()
		e.destroy(h)
		b.StartTimer()
	}
	b.ReportMetric(float64(returned)/1e6/float64(b.N), "restore-ms/op")
}
