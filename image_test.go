package gvisor_test

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/imagetest"
)

// imageEnv is a real-runsc env with a private image store and a registry on loopback that it
// may reach over plain HTTP.
type imageEnv struct {
	*realEnv
	reg   *imagetest.Registry
	store string
}

func newImageEnv(t *testing.T, opts ...gvisor.Option) *imageEnv {
	t.Helper()
	requireRunsc(t)
	reg := imagetest.Serve(t)
	store := filepath.Join(t.TempDir(), "images")
	opts = append([]gvisor.Option{gvisor.WithImageStore(store), gvisor.WithInsecureRegistries(reg.Host())}, opts...)
	return &imageEnv{realEnv: newRealEnv(t, opts...), reg: reg, store: store}
}

// imageDoc is a cell whose root is the image ref, running argv (nil: the image's own command).
func imageDoc(id, ref string, argv ...string) *cellos.ExecutionCellDocument {
	d := doc(id, argv...)
	if len(argv) == 0 {
		d.Spec.Run.Argv = nil
	}
	d.Spec.Rootfs = &cellos.RootfsSpec{Image: ref}
	return d
}

// withConfig is img with its config replaced.
func withConfig(t *testing.T, img v1.Image, edit func(*v1.Config)) v1.Image {
	t.Helper()
	cf, err := img.ConfigFile()
	require.NoError(t, err)
	cfg := cf.Config
	edit(&cfg)
	out, err := mutate.Config(img, cfg)
	require.NoError(t, err)
	return out
}

func manifestHex(t *testing.T, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	require.NoError(t, err)
	return d.Hex
}

// storeEntries lists what the store holds below its top directory, as "dir/entry".
func storeEntries(t *testing.T, store string) []string {
	t.Helper()
	var out []string
	tops, err := os.ReadDir(store)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	require.NoError(t, err)
	for _, top := range tops {
		if !top.IsDir() {
			continue
		}
		sub, err := os.ReadDir(filepath.Join(store, top.Name()))
		require.NoError(t, err)
		for _, s := range sub {
			if s.IsDir() && top.Name() == "blobs" { // blobs/sha256/...
				inner, _ := os.ReadDir(filepath.Join(store, top.Name(), s.Name()))
				for _, i := range inner {
					out = append(out, top.Name()+"/"+s.Name()+"/"+i.Name())
				}
				continue
			}
			out = append(out, top.Name()+"/"+s.Name())
		}
	}
	return out
}

// layersIn lists the store's unpacked layers.
func layersIn(t *testing.T, store string) []string {
	var out []string
	for _, e := range storeEntries(t, store) {
		if strings.HasPrefix(e, "layers/") {
			out = append(out, e)
		}
	}
	return out
}

func TestImageCellRunsTheImagesProcess(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t)
	img := withConfig(t, imagetest.Busybox(t), func(c *v1.Config) {
		c.Cmd = []string{"/bin/sh", "-c", `echo "foo=$FOO pwd=$(pwd) ids=$(id -u):$(id -g) home=$HOME path=$PATH"`}
		c.Env = []string{"PATH=/bin", "FOO=from-image"}
		c.WorkingDir = "/srv"
		c.User = "app"
	})
	ref := e.reg.Push(t, "team/busybox", "1", img)

	h := e.create(imageDoc("img-default", ref))
	require.NotNil(t, h.RootfsDigestSHA256)
	assert.Equal(t, manifestHex(t, img), *h.RootfsDigestSHA256, "the handle carries the manifest's digest")
	st, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	require.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st, "stderr: %s", e.out(h.CellID).stderr.String())
	assert.Equal(t, "foo=from-image pwd=/srv ids=1000:1000 home=/home/app path=/bin\n", e.out(h.CellID).stdout.String())

	// The document wins over the image: argv, env, workingDir, user.
	d := imageDoc("img-doc", ref, "/bin/sh", "-c", `echo "foo=$FOO pwd=$(pwd) ids=$(id -u):$(id -g)"`)
	d.Spec.Run.Env = map[string]string{"FOO": "from-doc"}
	d.Spec.Run.WorkingDir = "/tmp"
	d.Spec.Run.User = &cellos.UserSpec{UID: 4242, GID: 4343}
	assert.Equal(t, "foo=from-doc pwd=/tmp ids=4242:4343\n", e.probe(d))
	e.assertNothingLeftAfterDestroyAll(t)
}

// assertNothingLeftAfterDestroyAll destroys every cell of the env and checks that the bundle
// root holds nothing and no overlay of the image store stays mounted.
func (e *imageEnv) assertNothingLeftAfterDestroyAll(t *testing.T) {
	t.Helper()
	cells, err := e.b.List(context.Background())
	require.NoError(t, err)
	for _, c := range cells {
		_, err := e.b.Destroy(context.Background(), cellos.CellHandle{CellID: c.ID})
		require.NoError(t, err)
	}
	e.assertNothingLeft()
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(t, err)
	assert.NotContains(t, string(mounts), e.store, "an overlay of the store is still mounted")
}

func TestImageCellIsolation(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t)
	// busybox for the shell and its tools, python3 for the probes that need it.
	py := imagetest.Python(t)
	bbLayers, err := imagetest.Busybox(t).Layers()
	require.NoError(t, err)
	img, err := mutate.AppendLayers(py, bbLayers...)
	require.NoError(t, err)
	ref := e.reg.Push(t, "team/probe", "1", img)
	marker, err := os.CreateTemp("/tmp", "cellos-host-marker-*")
	require.NoError(t, err)
	marker.Close()
	t.Cleanup(func() { os.Remove(marker.Name()) })

	out := e.probe(imageDoc("img-iso", ref, "/bin/sh", "-c", isolationProbeScript(marker.Name())))
	got := lines(out)
	assert.Equal(t, "0000000000000000", got["caps"], "inheritable, permitted, effective, bounding sets empty")
	assert.Equal(t, "4", got["capsets"])
	assert.Equal(t, "0", got["ambient"], "ambient capabilities raised")
	assert.Equal(t, "1", got["nnp"], "no-new-privileges")
	assert.Contains(t, out, "uid=65534 gid=65534 user=nobody", "an image without User runs as the library's default")
	assert.Equal(t, "no", got["rootwrite"], "the image root is read-only")
	assert.Equal(t, "no", got["usrwrite"])
	assert.Equal(t, "probe", got["tmpwrite"])
	assert.Equal(t, "tmpfs", got["tmpfs"])
	assert.Equal(t, "hidden", got["hostmarker"])
	assert.Equal(t, "lo", got["ifaces"], "loopback only")
	assert.Equal(t, "img-iso", got["hostname"])
	assert.Equal(t, "1", got["pid"], "the workload is pid 1 of its own namespace")
	for l := range strings.Lines(out) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "visible="); ok {
			assert.Contains(t, []string{"/home", "/srv"}, v, "only the image's own directories are there")
		}
	}
	assert.Equal(t, "group passwd", got["etc"], "the image's /etc, not the host's")
	assert.Equal(t, "42", got["awk"])
	e.assertNothingLeftAfterDestroyAll(t)
}

func TestImageWritableRootLeavesTheImageAlone(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t)
	ref := e.reg.Push(t, "team/busybox", "w", imagetest.Busybox(t))
	d := imageDoc("img-w1", ref, "/bin/sh", "-c", "echo changed > /etc/passwd && echo new > /bin/new && cat /etc/passwd /bin/new")
	d.Spec.Rootfs.Writable = true
	d.Spec.Run.User = &cellos.UserSpec{UID: 0, GID: 0}
	e2 := newImageEnvSharing(t, e, gvisor.WithAllowRoot(true))
	assert.Equal(t, "changed\nnew\n", e2.probe(d))
	out := e2.probe(imageDoc("img-w2", ref, "/bin/sh", "-c", "grep -c app /etc/passwd; test -e /bin/new && echo leaked || echo clean"))
	assert.Equal(t, "1\nclean\n", out, "the next cell sees the image as it was")
	for _, l := range layersIn(t, e.store) {
		_, err := os.Stat(filepath.Join(e.store, l, "fs", "bin", "new"))
		assert.ErrorIs(t, err, os.ErrNotExist, "a cell's write reached the layer %s", l)
	}
	e2.assertNothingLeftAfterDestroyAll(t)
}

// newImageEnvSharing is another env on the same registry and store, with more options.
func newImageEnvSharing(t *testing.T, e *imageEnv, opts ...gvisor.Option) *imageEnv {
	opts = append([]gvisor.Option{gvisor.WithImageStore(e.store), gvisor.WithInsecureRegistries(e.reg.Host())}, opts...)
	return &imageEnv{realEnv: newRealEnv(t, opts...), reg: e.reg, store: e.store}
}

func TestImageCellsShareOneCopy(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t)
	img := imagetest.Busybox(t)
	ref := e.reg.Push(t, "team/busybox", "shared", img)
	const n = 4
	var wg sync.WaitGroup
	errs := make(chan error, n)
	hs := make(chan cellos.CellHandle, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h, err := e.b.Create(context.Background(), imageDoc("img-share-"+string(rune('a'+i)), ref, "/bin/sh", "-c", "cat /etc/passwd >/dev/null"))
			if err != nil {
				errs <- err
				return
			}
			hs <- h
		}()
	}
	wg.Wait()
	close(errs)
	close(hs)
	for err := range errs {
		require.NoError(t, err)
	}
	for h := range hs {
		st, err := e.b.WaitForExit(context.Background(), h.CellID)
		require.NoError(t, err)
		assert.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st)
	}
	layers, err := img.Layers()
	require.NoError(t, err)
	for _, l := range layers {
		d, err := l.Digest()
		require.NoError(t, err)
		assert.Equal(t, 1, e.reg.BlobGets(d.String()), "layer %s fetched once for %d concurrent cells", d, n)
	}
	assert.Len(t, layersIn(t, e.store), len(layers), "one unpacked copy of each layer")
	e.assertNothingLeftAfterDestroyAll(t)
}

func TestImageRootUserIsRefused(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t)
	ref := e.reg.Push(t, "team/root", "1", withConfig(t, imagetest.Busybox(t), func(c *v1.Config) { c.User = "root" }))
	_, err := e.b.Create(context.Background(), imageDoc("img-root", ref))
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
	assert.Contains(t, cellos.Fields(err), "spec.run.user")
	assert.Contains(t, err.Error(), "runs as root")
	e.assertNothingLeft()

	// The document may name root explicitly; the operator's policy still applies to it.
	d := imageDoc("img-root-doc", ref, "/bin/sh", "-c", "id -u")
	d.Spec.Run.User = &cellos.UserSpec{}
	_, err = e.b.Create(context.Background(), d)
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
	assert.Contains(t, err.Error(), "WithAllowRoot")
	e.assertNothingLeft()
}

// createFails creates d, which must fail as InvalidSpec naming field with msg, and checks that
// nothing stayed behind: no bundle, no process, no mount, no half-written pull, and, when the
// pull itself failed, no layer of it in the store.
func (e *imageEnv) createFails(t *testing.T, d *cellos.ExecutionCellDocument, field, msg string) {
	t.Helper()
	before := storeEntries(t, e.store)
	_, err := e.b.Create(context.Background(), d)
	require.Error(t, err)
	assert.ErrorIs(t, err, cellos.ErrInvalidSpec)
	assert.Contains(t, cellos.Fields(err), field, "%v", err)
	assert.Contains(t, err.Error(), msg)
	assert.Contains(t, err.Error(), d.Spec.ID, "the error names the cell")
	e.assertNothingLeft()
	var tmp []string
	for _, s := range storeEntries(t, e.store) {
		if strings.HasPrefix(s, "tmp/") {
			tmp = append(tmp, s)
		}
	}
	assert.Empty(t, tmp, "half-written pulls left in the store")
	if field == "spec.rootfs.image" { // a pull that failed; other errors come after a good pull
		assert.Subset(t, before, layersIn(t, e.store), "layers of the failed pull stayed in the store")
	}
}

func TestImageCreateFailuresLeaveNothing(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t)
	// A blob served with other bytes than its digest's (a layer of its own: the busybox layer is
	// pulled intact below).
	bad := imagetest.RandomLayer(t, 64<<10)
	ref := e.reg.Push(t, "team/corrupt", "1", imagetest.Image(t, v1.Config{Cmd: []string{"/x"}}, bad))
	ld, err := bad.Digest()
	require.NoError(t, err)
	e.reg.CorruptBlob(ld.String())
	e.createFails(t, imageDoc("img-corrupt", ref), "spec.rootfs.image", "digest mismatch")

	// A by-digest reference the manifest served does not match.
	wrong := e.reg.Host() + "/team/busybox@sha256:" + strings.Repeat("ab", 32)
	e.createFails(t, imageDoc("img-nosuch-digest", wrong), "spec.rootfs.image", "")

	e.createFails(t, imageDoc("img-unparsable", "UPPER/Case:tag"), "spec.rootfs.image", "")
	e.createFails(t, imageDoc("img-absent", e.reg.Host()+"/team/absent:1"), "spec.rootfs.image", "")
	e.createFails(t, imageDoc("img-no-cmd", e.reg.Push(t, "team/nocmd", "1",
		withConfig(t, imagetest.Busybox(t), func(c *v1.Config) { c.Cmd, c.Entrypoint = nil, nil }))), "spec.run.argv", "neither Entrypoint nor Cmd")
	e.createFails(t, imageDoc("img-rel-wd", e.reg.Push(t, "team/relwd", "1",
		withConfig(t, imagetest.Busybox(t), func(c *v1.Config) { c.WorkingDir = "srv" }))), "spec.run.workingDir", "absolute")
}

func TestImageHostileImagesLeaveNothing(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t, gvisor.WithImageLimits(gvisor.ImageLimits{MaxLayerBytes: 1 << 20}))
	cfg := v1.Config{Cmd: []string{"/bin/sh"}}
	for _, c := range []struct {
		name  string
		layer v1.Layer
		msg   string
	}{
		{"tar-slip", imagetest.Layer(t, imagetest.Symlink("evil", "/"), imagetest.File("evil/tmp/cellos-tar-slip", "pwned", 0o644)), "evil/tmp/cellos-tar-slip"},
		{"dotdot", imagetest.Layer(t, imagetest.File("../../../tmp/cellos-dotdot", "pwned", 0o644)), "cellos-dotdot"},
		{"overlay-xattr", imagetest.Layer(t, imagetest.Entry{Header: xattrHeader("etc", "trusted.overlay.opaque", "y")}), "trusted.overlay"},
		{"too-large", imagetest.RandomLayer(t, 2<<20), "limit"},
	} {
		ref := e.reg.Push(t, "hostile/"+c.name, "1", imagetest.Image(t, cfg, c.layer))
		e.createFails(t, imageDoc("img-"+c.name, ref), "spec.rootfs.image", c.msg)
	}
	for _, p := range []string{"/tmp/cellos-tar-slip", "/tmp/cellos-dotdot"} {
		assert.NoFileExists(t, p, "a layer wrote outside the store")
	}
	// A manifest of a media type no runtime runs.
	e.reg.ServeManifest("hostile/chart", "1", "application/vnd.cncf.helm.chart.content.v1.tar+gzip", []byte(`{"schemaVersion":2}`))
	e.createFails(t, imageDoc("img-media", e.reg.Host()+"/hostile/chart:1"), "spec.rootfs.image", "media type")
	assert.Empty(t, layersIn(t, e.store), "no layer of a hostile image is kept")
}

// xattrHeader is a directory entry carrying one extended attribute.
func xattrHeader(name, key, value string) *tar.Header {
	return &tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, Format: tar.FormatPAX,
		PAXRecords: map[string]string{"SCHILY.xattr." + key: value}}
}

func TestImagePlainHTTPOnlyWhenAllowed(t *testing.T) {
	t.Parallel()
	requireRunsc(t)
	reg := imagetest.Serve(t)
	ref := reg.Push(t, "team/busybox", "1", imagetest.Busybox(t))
	store := filepath.Join(t.TempDir(), "images")
	e := &imageEnv{realEnv: newRealEnv(t, gvisor.WithImageStore(store)), reg: reg, store: store}
	gets := reg.Gets()
	e.createFails(t, imageDoc("img-http", ref), "spec.rootfs.image", "insecure registry")
	assert.Equal(t, gets, reg.Gets(), "nothing was fetched over plain HTTP")
	// Named insecure, the same registry serves the image.
	e2 := newImageEnvSharing(t, e)
	assert.Equal(t, "hello from busybox\n", e2.probe(imageDoc("img-http-ok", ref)))
}

func TestImageFromOCILayout(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t)
	dir := filepath.Join(t.TempDir(), "layout")
	imagetest.Layout(t, dir, "v1", withConfig(t, imagetest.Busybox(t), func(c *v1.Config) {
		c.Cmd = []string{"/bin/sh", "-c", "echo from the layout"}
	}))
	e.createFails(t, imageDoc("img-layout-tag", "oci-layout:"+dir+":nosuch"), "spec.rootfs.image", "nosuch")
	assert.Equal(t, "from the layout\n", e.probe(imageDoc("img-layout", "oci-layout:"+dir+":v1")))
	e.assertNothingLeftAfterDestroyAll(t)
}

func TestImageStoreIsProtectedFromBinds(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t)
	ref := e.reg.Push(t, "team/busybox", "1", imagetest.Busybox(t))
	_, err := e.b.Pull(context.Background(), ref)
	require.NoError(t, err)
	d := sh("bind-store", "true")
	d.Spec.Mounts = []cellos.MountSpec{{Type: cellos.MountBind, Source: e.store, Destination: "/data"}}
	_, err = e.b.Create(context.Background(), d)
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
	assert.Contains(t, cellos.Fields(err), "spec.mounts[0].source")
	d.Spec.Mounts[0].Source = filepath.Dir(e.store) // a directory holding the store
	_, err = e.b.Create(context.Background(), d)
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
	e.createFails(t, imageDoc("img-layout-in-store", "oci-layout:"+e.store+":x"), "spec.rootfs.image", "protects")

	// WithBindSources bounds the host files a document names: layouts too.
	allowed := t.TempDir()
	layoutDir := filepath.Join(t.TempDir(), "layout")
	imagetest.Layout(t, layoutDir, "v1", imagetest.Busybox(t))
	e2 := newImageEnvSharing(t, e, gvisor.WithBindSources(allowed))
	e2.createFails(t, imageDoc("img-layout-outside", "oci-layout:"+layoutDir+":v1"), "spec.rootfs.image", "WithBindSources")
	_, err = e2.b.Pull(context.Background(), "oci-layout:"+layoutDir+":v1")
	require.ErrorIs(t, err, cellos.ErrInvalidSpec)
}

func TestImageRemoveKeepsRunningCells(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t)
	ref := e.reg.Push(t, "team/busybox", "rm", imagetest.Busybox(t))
	h := e.create(imageDoc("img-rm", ref, "/bin/sh", "-c", "sleep 2; cat /etc/passwd | grep -c app"))
	require.NoError(t, e.b.RemoveImage(context.Background(), ref))
	rep, err := e.b.PruneImages(context.Background())
	require.NoError(t, err)
	assert.NotZero(t, rep.InUse, "the running cell's layers are in use")
	assert.NotEmpty(t, layersIn(t, e.store), "the running cell's layers are kept")
	st, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	assert.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st)
	assert.Equal(t, "1\n", e.out(h.CellID).stdout.String())
	e.destroy(h)
	rep, err = e.b.PruneImages(context.Background())
	require.NoError(t, err)
	assert.Zero(t, rep.InUse)
	assert.NotZero(t, rep.Layers)
	assert.Empty(t, layersIn(t, e.store), "unused layers are deleted")
	err = e.b.RemoveImage(context.Background(), ref)
	assert.ErrorIs(t, err, cellos.ErrNotTracked)
}

func TestImageListAndConfig(t *testing.T) {
	t.Parallel()
	e := newImageEnv(t)
	img := withConfig(t, imagetest.Busybox(t), func(c *v1.Config) { c.Cmd = []string{"/bin/echo", "configured"} })
	ref := e.reg.Push(t, "team/busybox", "cfg", img)

	_, err := e.b.Config(imageDoc("img-cfg", ref))
	require.ErrorIs(t, err, cellos.ErrInvalidSpec, "Config never pulls")
	assert.Contains(t, err.Error(), "pull it first")

	info, err := e.b.Pull(context.Background(), ref)
	require.NoError(t, err)
	assert.Equal(t, "sha256:"+manifestHex(t, img), info.Digest)
	assert.Equal(t, 1, info.Layers)
	assert.Positive(t, info.Size)
	imgs, err := e.b.Images(context.Background())
	require.NoError(t, err)
	require.Len(t, imgs, 1)
	assert.Equal(t, ref, imgs[0].Ref)
	assert.WithinDuration(t, time.Now(), imgs[0].Pulled, time.Minute)

	data, err := e.b.Config(imageDoc("img-cfg", ref))
	require.NoError(t, err)
	assert.Contains(t, string(data), `"configured"`)
	assert.Contains(t, string(data), `"uid": 65534`)
	e.assertNothingLeft()
}
