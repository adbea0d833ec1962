package image_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/internal/image"
	"github.com/cellos/cellos-host-gvisor/internal/imagetest"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
)

var cfg = v1.Config{Cmd: []string{"/bin/true"}}

func open(t *testing.T, opts image.Options) *image.Store {
	t.Helper()
	s, err := image.Open(filepath.Join(t.TempDir(), "store"), opts)
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

func ref(t *testing.T, s string) image.Ref {
	t.Helper()
	r, err := image.ParseRef(s)
	require.NoError(t, err)
	return r
}

func entries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	require.NoError(t, err)
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

func TestParseRef(t *testing.T) {
	for _, c := range []struct{ in, dir, tag string }{
		{"oci-layout:/srv/l", "/srv/l", "latest"},
		{"oci-layout:/srv/l:v1", "/srv/l", "v1"},
		{"oci-layout:/srv/a:b/c", "/srv/a:b/c", "latest"},
	} {
		r := ref(t, c.in)
		dir, tag, ok := r.Layout()
		assert.True(t, ok, c.in)
		assert.Equal(t, c.dir, dir, c.in)
		assert.Equal(t, c.tag, tag, c.in)
		assert.Equal(t, c.in, r.String())
	}
	for _, bad := range []string{"oci-layout:rel/dir", "oci-layout:/srv/../x:v", "oci-layout:/srv/l:", "UPPER/x", "a b", "x@sha256:12"} {
		_, err := image.ParseRef(bad)
		assert.Error(t, err, bad)
	}
	_, _, ok := ref(t, "registry.example/team/python:3.12").Layout()
	assert.False(t, ok)
}

func TestPullGetListRemoveGC(t *testing.T) {
	reg := imagetest.Serve(t)
	shared := imagetest.Layer(t, imagetest.File("shared", "s", 0o644))
	a := reg.Push(t, "a", "1", imagetest.Image(t, cfg, shared, imagetest.Layer(t, imagetest.File("a", "a", 0o644))))
	b := reg.Push(t, "b", "1", imagetest.Image(t, cfg, shared, imagetest.Layer(t, imagetest.File("b", "b", 0o644))))
	s := open(t, image.Options{Insecure: []string{reg.Host()}})
	ctx := context.Background()

	_, err := s.Get(ctx, ref(t, a))
	require.ErrorIs(t, err, image.ErrNotFound)
	var events []image.Progress
	var mu sync.Mutex
	ia, err := s.Pull(ctx, ref(t, a), func(p image.Progress) { mu.Lock(); events = append(events, p); mu.Unlock() })
	require.NoError(t, err)
	require.Len(t, ia.Layers, 2)
	for _, l := range ia.Layers {
		assert.DirExists(t, l)
	}
	assert.FileExists(t, filepath.Join(ia.Layers[1], "a"))
	assert.Equal(t, "resolve", events[0].Phase)
	assert.Equal(t, 2, events[0].Layers)
	last := events[len(events)-1]
	assert.Equal(t, "done", last.Phase)
	assert.Equal(t, last.ImageTotal, last.ImageDone)

	ib, err := s.Pull(ctx, ref(t, b), nil)
	require.NoError(t, err)
	assert.Equal(t, ia.Layers[0], ib.Layers[0], "a layer shared by two images is stored once")
	assert.Len(t, entries(t, filepath.Join(s.Dir(), "layers")), 3)

	got, err := s.Get(ctx, ref(t, a))
	require.NoError(t, err)
	assert.Equal(t, ia.Digest, got.Digest)
	assert.Equal(t, cfg.Cmd, got.Config.Config.Cmd)
	list, err := s.List(ctx)
	require.NoError(t, err)
	require.Len(t, list, 2)
	assert.Equal(t, []string{a, b}, []string{list[0].Ref, list[1].Ref})

	require.NoError(t, s.Remove(ctx, ref(t, a)))
	require.ErrorIs(t, s.Remove(ctx, ref(t, a)), image.ErrNotFound)
	rep, err := s.GC(ctx)
	require.NoError(t, err)
	assert.Equal(t, 1, rep.Layers, "a's own layer; the shared one is b's too")
	assert.Equal(t, 2, rep.Blobs, "a's manifest and config")
	assert.NoDirExists(t, filepath.Dir(ia.Layers[1]))
	assert.DirExists(t, ia.Layers[0])
	_, err = s.Get(ctx, ref(t, b))
	require.NoError(t, err)
}

func TestGCKeepsLayersInUse(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting an overlay needs root")
	}
	reg := imagetest.Serve(t)
	used := reg.Push(t, "used", "1", imagetest.Image(t, cfg, imagetest.Layer(t, imagetest.File("u", "u", 0o644))))
	mounted := reg.Push(t, "mounted", "1", imagetest.Image(t, cfg, imagetest.Layer(t, imagetest.File("m", "m", 0o644))))
	s := open(t, image.Options{Insecure: []string{reg.Host()}})
	ctx := context.Background()
	img, release, err := s.Use(ctx, ref(t, used), true, nil)
	require.NoError(t, err)
	m, err := s.Pull(ctx, ref(t, mounted), nil)
	require.NoError(t, err)
	target := t.TempDir()
	require.NoError(t, unix.Mount("overlay", target, "overlay", unix.MS_RDONLY, "lowerdir="+m.Layers[0]+":"+t.TempDir()))
	t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
	require.NoError(t, s.Remove(ctx, ref(t, used)))
	require.NoError(t, s.Remove(ctx, ref(t, mounted)))

	// GC waits for the use to end: a cell's Create holds it until its root is mounted.
	done := make(chan image.GCReport)
	go func() {
		rep, err := s.GC(ctx)
		assert.NoError(t, err)
		done <- rep
	}()
	select {
	case <-done:
		t.Fatal("GC ran while a Use held the store")
	default:
	}
	assert.DirExists(t, img.Layers[0])
	release()
	rep := <-done
	assert.Equal(t, 1, rep.InUse, "the mounted layer is kept")
	assert.Equal(t, 1, rep.Layers, "the released one goes")
	assert.DirExists(t, m.Layers[0])
	assert.NoDirExists(t, img.Layers[0])
}

func TestConcurrentPullsFetchOnce(t *testing.T) {
	reg := imagetest.Serve(t)
	img := imagetest.Image(t, cfg, imagetest.RandomLayer(t, 1<<20), imagetest.RandomLayer(t, 2<<20))
	r := reg.Push(t, "c", "1", img)
	s := open(t, image.Options{Insecure: []string{reg.Host()}})
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.Pull(context.Background(), ref(t, r), nil)
			assert.NoError(t, err)
		}()
	}
	wg.Wait()
	layers, err := img.Layers()
	require.NoError(t, err)
	for _, l := range layers {
		d, err := l.Digest()
		require.NoError(t, err)
		assert.Equal(t, 1, reg.BlobGets(d.String()), "layer %s", d)
	}
	assert.Empty(t, entries(t, filepath.Join(s.Dir(), "tmp")))
}

func TestPullFailuresKeepNothing(t *testing.T) {
	reg := imagetest.Serve(t)
	s := open(t, image.Options{Insecure: []string{reg.Host()}, Limits: image.Limits{MaxLayerBytes: 1 << 20}})
	ctx := context.Background()
	bad := imagetest.RandomLayer(t, 64<<10)
	corrupt := reg.Push(t, "corrupt", "1", imagetest.Image(t, cfg, bad))
	d, err := bad.Digest()
	require.NoError(t, err)
	reg.CorruptBlob(d.String())
	big := reg.Push(t, "big", "1", imagetest.Image(t, cfg, imagetest.RandomLayer(t, 2<<20)))
	reg.ServeManifest("chart", "1", "application/vnd.cncf.helm.chart.content.v1.tar+gzip", []byte(`{}`))
	good := imagetest.Image(t, cfg, imagetest.Layer(t, imagetest.File("f", "f", 0o644)))
	reg.Push(t, "good", "1", good)
	// A registry that answers a by-digest reference with another manifest.
	wrongDigest := "sha256:" + fmt.Sprintf("%064x", 1)
	raw, err := good.RawManifest()
	require.NoError(t, err)
	mt, err := good.MediaType()
	require.NoError(t, err)
	reg.ServeManifest("good", wrongDigest, string(mt), raw)
	wrong := reg.Host() + "/good@" + wrongDigest
	oddLayer := imagetest.LayerWithMediaType(t, "application/vnd.example.not-a-layer", imagetest.File("f", "f", 0o644))
	odd := reg.Push(t, "odd", "1", imagetest.Image(t, cfg, oddLayer))
	for _, c := range []struct {
		ref  string
		want error
	}{
		{corrupt, image.ErrDigestMismatch},
		{big, image.ErrTooLarge},
		{reg.Host() + "/chart:1", image.ErrMediaType},
		{odd, image.ErrMediaType},
		{wrong, image.ErrDigestMismatch},
		{reg.Host() + "/absent:1", image.ErrNotFound},
	} {
		_, err := s.Pull(ctx, ref(t, c.ref), nil)
		assert.ErrorIs(t, err, c.want, "%s: %v", c.ref, err)
		for _, d := range []string{"tmp", "layers", "refs", "blobs/sha256"} {
			assert.Empty(t, entries(t, filepath.Join(s.Dir(), d)), "%s after pulling %s", d, c.ref)
		}
	}
}

func TestPlainHTTPOnlyForInsecureRegistries(t *testing.T) {
	reg := imagetest.Serve(t)
	r := reg.Push(t, "p", "1", imagetest.Image(t, cfg, imagetest.Layer(t, imagetest.File("f", "f", 0o644))))
	_, err := open(t, image.Options{}).Pull(context.Background(), ref(t, r), nil)
	require.ErrorIs(t, err, image.ErrInsecure)
	assert.Contains(t, err.Error(), "insecure registry")

	tls := imagetest.ServeTLS(t)
	r = tls.Push(t, "p", "1", imagetest.Image(t, cfg, imagetest.Layer(t, imagetest.File("f", "f", 0o644))))
	_, err = open(t, image.Options{Transport: tls.Transport()}).Pull(context.Background(), ref(t, r), nil)
	require.NoError(t, err, "HTTPS needs no option")
}

func TestIndexAndLayout(t *testing.T) {
	reg := imagetest.Serve(t)
	mine := imagetest.Image(t, v1.Config{Cmd: []string{"mine"}}, imagetest.Layer(t, imagetest.File("f", "mine", 0o644)))
	other := imagetest.Image(t, v1.Config{Cmd: []string{"other"}}, imagetest.Layer(t, imagetest.File("f", "other", 0o644)))
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: other, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "s390x"}}},
		mutate.IndexAddendum{Add: mine, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: runtime.GOARCH}}})
	r := reg.PushIndex(t, "idx", "1", idx)
	s := open(t, image.Options{Insecure: []string{reg.Host()}})
	img, err := s.Pull(context.Background(), ref(t, r), nil)
	require.NoError(t, err)
	assert.Equal(t, []string{"mine"}, img.Config.Config.Cmd, "the index's manifest for this platform")

	dir := filepath.Join(t.TempDir(), "layout")
	imagetest.Layout(t, dir, "v1", mine)
	img, err = s.Pull(context.Background(), ref(t, "oci-layout:"+dir+":v1"), nil)
	require.NoError(t, err)
	assert.Equal(t, []string{"mine"}, img.Config.Config.Cmd)
	_, err = s.Pull(context.Background(), ref(t, "oci-layout:"+dir+":v2"), nil)
	assert.ErrorIs(t, err, image.ErrNotFound)
}

func TestStoreOfAnotherUserIsRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	dir := filepath.Join(t.TempDir(), "store")
	require.NoError(t, os.Mkdir(dir, 0o711))
	require.NoError(t, os.Chown(dir, 4242, 4242))
	_, err := image.Open(dir, image.Options{})
	require.ErrorIs(t, err, owned.ErrRefused)
	assert.Empty(t, entries(t, dir))
}

// TestAStoppedPullDoesNotStopAnother: two callers share one pull; the first gives up, the second
// still gets the image.
func TestAStoppedPullDoesNotStopAnother(t *testing.T) {
	reg := imagetest.Serve(t)
	r := reg.Push(t, "s", "1", imagetest.Image(t, cfg, imagetest.RandomLayer(t, 4<<20)))
	started := make(chan struct{}, 16)
	reg.Wrap(func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			if strings.Contains(req.URL.Path, "/blobs/") {
				started <- struct{}{}
				time.Sleep(300 * time.Millisecond)
			}
			h.ServeHTTP(w, req)
		})
	})
	s := open(t, image.Options{Insecure: []string{reg.Host()}})
	first, cancel := context.WithCancel(context.Background())
	errs := make(chan error, 1)
	go func() {
		_, err := s.Pull(first, ref(t, r), nil)
		errs <- err
	}()
	<-started
	second := make(chan error, 1)
	go func() {
		_, err := s.Pull(context.Background(), ref(t, r), nil)
		second <- err
	}()
	time.Sleep(50 * time.Millisecond) // the second joins the first's pull
	cancel()
	assert.ErrorIs(t, <-errs, context.Canceled)
	require.NoError(t, <-second, "the second caller's pull must not end with the first's")
	_, err := s.Get(context.Background(), ref(t, r))
	require.NoError(t, err)
}

// TestGCRefusesWhenANameCannotBeRead: a prune deletes nothing when it cannot tell what a name
// needs.
func TestGCRefusesWhenANameCannotBeRead(t *testing.T) {
	reg := imagetest.Serve(t)
	r := reg.Push(t, "g", "1", imagetest.Image(t, cfg, imagetest.Layer(t, imagetest.File("f", "f", 0o644))))
	s := open(t, image.Options{Insecure: []string{reg.Host()}})
	img, err := s.Pull(context.Background(), ref(t, r), nil)
	require.NoError(t, err)
	blob := filepath.Join(s.Dir(), "blobs", "sha256", strings.TrimPrefix(img.Digest, "sha256:"))
	require.NoError(t, os.WriteFile(blob, []byte("{}"), 0o644)) // the manifest, damaged
	_, err = s.GC(context.Background())
	require.ErrorContains(t, err, "not pruning")
	assert.DirExists(t, img.Layers[0])
	require.NoError(t, s.Remove(context.Background(), ref(t, r)))
	rep, err := s.GC(context.Background())
	require.NoError(t, err)
	assert.Equal(t, 1, rep.Layers)
}
