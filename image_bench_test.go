package gvisor_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/imagetest"
)

// The image store, measured against the real runsc and GNU tar in the same run:
//
//	go test -run '^$' -bench 'Image' -benchtime 10x .

// BenchmarkImagePull pulls and unpacks the ~50 MiB python image from a registry on loopback into
// a new store, against `tar -xzf` of the same compressed layers.
func BenchmarkImagePull(b *testing.B) {
	requireRunsc(b)
	reg := imagetest.Serve(b)
	img := imagetest.Python(b)
	ref := reg.Push(b, "bench/python", "1", img)
	layers, err := img.Layers()
	if err != nil {
		b.Fatal(err)
	}
	blobs := b.TempDir()
	var files []string
	var compressed int64
	for i, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			b.Fatal(err)
		}
		p := filepath.Join(blobs, fmt.Sprintf("%d.tar.gz", i))
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(f, rc)
		rc.Close()
		f.Close()
		if err != nil {
			b.Fatal(err)
		}
		compressed += n
		files = append(files, p)
	}
	var pull, tarx time.Duration
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		store := filepath.Join(b.TempDir(), "images")
		be, err := gvisor.New(gvisor.WithImageStore(store), gvisor.WithInsecureRegistries(reg.Host()), gvisor.WithSpareShim(false))
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		start := time.Now()
		if _, err := be.Pull(context.Background(), ref); err != nil {
			b.Fatal(err)
		}
		pull += time.Since(start)
		b.StopTimer()
		_ = be.Close(context.Background())
		dir := filepath.Join(b.TempDir(), fmt.Sprint("x", i))
		start = time.Now()
		for j, f := range files {
			d := filepath.Join(dir, strconv.Itoa(j))
			if err := os.MkdirAll(d, 0o755); err != nil {
				b.Fatal(err)
			}
			if out, err := exec.Command("tar", "-xzf", f, "-C", d).CombinedOutput(); err != nil {
				b.Fatalf("tar: %v: %s", err, out)
			}
		}
		tarx += time.Since(start)
		b.StartTimer()
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(float64(pull.Milliseconds())/n, "pull-ms/op")
	b.ReportMetric(float64(tarx.Milliseconds())/n, "tar-x-ms/op")
	b.ReportMetric(float64(pull)/float64(tarx), "pull/tar-x")
	b.ReportMetric(float64(compressed)/(1<<20), "compressed-MiB")
}

// BenchmarkImageCellStart runs /bin/true to its end from the busybox image: raw runsc on a
// directory holding the image's files, the library on that directory (rootfs.path), on the image
// in the store (the hundredth cell), and on the image in a new store (the first cell: pull too).
func BenchmarkImageCellStart(b *testing.B) {
	runscBin := requireRunsc(b)
	reg := imagetest.Serve(b)
	ref := reg.Push(b, "bench/busybox", "1", imagetest.Busybox(b))
	store := filepath.Join(b.TempDir(), "images")
	e := newRealEnv(b, gvisor.WithImageStore(store), gvisor.WithInsecureRegistries(reg.Host()))
	info, err := e.b.Pull(context.Background(), ref)
	if err != nil {
		b.Fatal(err)
	}
	// A directory with the image's files, as someone would unpack it for runsc.
	dir := b.TempDir()
	flat := filepath.Join(dir, "flat")
	layer := filepath.Join(store, "layers", layerOf(b, store, info), "fs")
	if out, err := exec.Command("cp", "-a", layer, flat).CombinedOutput(); err != nil {
		b.Fatalf("cp: %v: %s", err, out)
	}
	runOne := func(b *testing.B, be *gvisor.Backend, d *cellos.ExecutionCellDocument) {
		h, err := be.Create(context.Background(), d)
		if err != nil {
			b.Fatal(err)
		}
		st, err := be.WaitForExit(context.Background(), h.CellID)
		if err != nil || st.Code != 0 {
			b.Fatal(st, err)
		}
		if _, err := be.Destroy(context.Background(), h); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("raw-runsc", func(b *testing.B) {
		bundle, state := filepath.Join(dir, "raw"), filepath.Join(dir, "state")
		for _, d := range []string{bundle, state} {
			if err := os.MkdirAll(d, 0o700); err != nil {
				b.Fatal(err)
			}
		}
		d := doc("raw", "/bin/true")
		d.Spec.Rootfs = &cellos.RootfsSpec{Path: flat}
		cfg, err := e.b.Config(d)
		if err != nil {
			b.Fatal(err)
		}
		cfg = []byte(strings.Replace(string(cfg), `"path": "rootfs"`, `"path": "`+flat+`"`, 1))
		if err := os.WriteFile(filepath.Join(bundle, "config.json"), cfg, 0o644); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		for i := range b.N {
			cmd := exec.Command(runscBin, "--root", state, "--network=none", "--ignore-cgroups", "run", "--bundle", bundle, fmt.Sprint("img-raw-", i))
			cmd.Dir = bundle
			if out, err := cmd.CombinedOutput(); err != nil {
				b.Fatalf("runsc run: %v: %s", err, out)
			}
		}
	})
	b.Run("directory-root", func(b *testing.B) {
		for range b.N {
			d := doc(benchID("img-dir"), "/bin/true")
			d.Spec.Rootfs = &cellos.RootfsSpec{Path: flat}
			runOne(b, e.b, d)
		}
	})
	b.Run("image-stored", func(b *testing.B) {
		for range b.N {
			runOne(b, e.b, imageDoc(benchID("img-stored"), ref, "/bin/true"))
		}
	})
	b.Run("image-first", func(b *testing.B) {
		for range b.N {
			b.StopTimer()
			fresh := newRealEnv(b, gvisor.WithImageStore(filepath.Join(b.TempDir(), "images")), gvisor.WithInsecureRegistries(reg.Host()))
			b.StartTimer()
			runOne(b, fresh.b, imageDoc(benchID("img-first"), ref, "/bin/true"))
		}
	})
}

func layerOf(b *testing.B, store string, info gvisor.ImageInfo) string {
	es, err := os.ReadDir(filepath.Join(store, "layers"))
	if err != nil || len(es) != 1 {
		b.Fatalf("want the one layer of %s in the store: %v %v", info.Ref, es, err)
	}
	return es[0].Name()
}

// BenchmarkImageDiskUse is the disk the python image takes in the store, and with 10 cells of it
// running: each cell's bundle, not a copy of the image.
func BenchmarkImageDiskUse(b *testing.B) {
	requireRunsc(b)
	reg := imagetest.Serve(b)
	ref := reg.Push(b, "bench/python", "1", imagetest.Python(b))
	for range b.N {
		store := filepath.Join(b.TempDir(), "images")
		e := newRealEnv(b, gvisor.WithImageStore(store), gvisor.WithInsecureRegistries(reg.Host()))
		if _, err := e.b.Pull(context.Background(), ref); err != nil {
			b.Fatal(err)
		}
		before := diskUse(b, store)
		for range 10 {
			benchCell(b, e, imageDoc(benchID("img-du"), ref, "/usr/bin/python3", "-c", "import time; time.sleep(600)"))
		}
		after := diskUse(b, store)
		bundles := diskUse(b, e.root)
		b.ReportMetric(before, "store-MiB")
		b.ReportMetric(after, "store-with-10-cells-MiB")
		b.ReportMetric(bundles/10, "bundle-MiB/cell")
	}
}

// diskUse is du's count of the disk the tree at dir takes, in MiB, on its own filesystem.
func diskUse(b *testing.B, dir string) float64 {
	out, err := exec.Command("du", "-skx", dir).Output()
	if err != nil {
		b.Fatal(err)
	}
	kib, err := strconv.ParseFloat(strings.Fields(string(out))[0], 64)
	if err != nil {
		b.Fatal(err)
	}
	return kib / 1024
}
