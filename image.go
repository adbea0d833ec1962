package gvisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/image"
)

// EnvImageStore overrides WithImageStore, as EnvBundleRoot does WithBundleRoot.
const EnvImageStore = "CELLOS_GVISOR_IMAGE_STORE"

// DefaultImageStore is the image store without WithImageStore or CELLOS_GVISOR_IMAGE_STORE, on
// persistent disk (unpacked layers are costly to fetch again; a tmpfs would hold them in memory):
// /var/lib/cellos-gvisor/images for root, $XDG_DATA_HOME/cellos-gvisor/images (default
// ~/.local/share) for other users.
func DefaultImageStore() string {
	const name = "cellos-gvisor/images"
	if os.Geteuid() == 0 {
		return filepath.Join("/var/lib", name)
	}
	if d := os.Getenv("XDG_DATA_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, name)
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local/share", name)
	}
	return filepath.Join(os.TempDir(), name)
}

// ImageLimits bound what a pull may bring onto the host; zero fields take the defaults (2 GiB per
// compressed layer, 8 GiB per unpacked layer, 16 GiB per image, 128 layers). A registry's sizes
// are not trusted: the bounds apply to the bytes as they arrive.
type ImageLimits struct {
	MaxLayerBytes         int64
	MaxLayerUnpackedBytes int64
	MaxImageBytes         int64
	MaxLayers             int
}

// WithImageStore sets the directory of the image store (default DefaultImageStore()). It follows
// the ownership rule of the library's directories. CELLOS_GVISOR_IMAGE_STORE overrides it.
func WithImageStore(dir string) Option {
	return func(o *options) error {
		if dir == "" {
			return fmt.Errorf("WithImageStore: empty path")
		}
		abs, err := filepath.Abs(dir)
		if err != nil {
			return fmt.Errorf("WithImageStore: %w", err)
		}
		o.imageStore = abs
		return nil
	}
}

// WithInsecureRegistries names the registries (host or host:port) that may be reached over plain
// HTTP. Every other registry is reached over HTTPS only.
func WithInsecureRegistries(hosts ...string) Option {
	return func(o *options) error {
		for _, h := range hosts {
			if h == "" || strings.ContainsAny(h, "/ \t\n") {
				return fmt.Errorf("WithInsecureRegistries: %q is not a host or host:port", h)
			}
		}
		o.insecure = append(o.insecure, hosts...)
		return nil
	}
}

// WithImageLimits bounds pulls (see ImageLimits).
func WithImageLimits(l ImageLimits) Option {
	return func(o *options) error {
		if l.MaxLayerBytes < 0 || l.MaxLayerUnpackedBytes < 0 || l.MaxImageBytes < 0 || l.MaxLayers < 0 {
			return fmt.Errorf("WithImageLimits: negative limit in %+v", l)
		}
		o.imageLimits = l
		return nil
	}
}

// ImageInfo describes an image in the store.
type ImageInfo struct {
	Ref    string    `json:"ref"`
	Digest string    `json:"digest"` // "sha256:HEX" of the manifest
	Layers int       `json:"layers"`
	Size   int64     `json:"size"` // unpacked bytes
	Pulled time.Time `json:"pulled"`
}

// PullProgress reports a pull as it goes; see WithPullProgress.
type PullProgress struct {
	Ref       string
	Layers    int    // layers of the image
	Layer     int    // 1-based; 0 for an event of the whole image
	Digest    string // the layer's
	Phase     string // "resolve", "download", "unpack", "done"
	LayerDone bool
	Cached    bool  // the layer was in the store already
	Bytes     int64 // of this layer (compressed), downloaded so far
	Size      int64 // of this layer (compressed)
	Done      int64 // bytes of all layers downloaded or found in the store
	Total     int64 // bytes of all layers
}

// PullOption configures one Pull.
type PullOption func(*pullOptions)

type pullOptions struct{ progress func(PullProgress) }

// WithPullProgress has f called with the pull's progress, from the pulling goroutines (f must be
// safe for concurrent use and quick).
func WithPullProgress(f func(PullProgress)) PullOption {
	return func(o *pullOptions) { o.progress = f }
}

// ImagePruneReport says what PruneImages removed.
type ImagePruneReport struct {
	Layers int   `json:"layers"`
	Blobs  int   `json:"blobs"`
	Bytes  int64 `json:"bytes"`
	InUse  int   `json:"inUse"` // layers kept because cells use them
}

// imageState is the Backend's image store, opened at its first use.
type imageState struct {
	mu    sync.Mutex
	store *image.Store
	dir   string
}

func (b *Backend) imageStoreDir() string {
	if d := os.Getenv(EnvImageStore); d != "" {
		if abs, err := filepath.Abs(d); err == nil {
			return abs
		}
		return d
	}
	if b.opts.imageStore != "" {
		return b.opts.imageStore
	}
	return DefaultImageStore()
}

// store opens the image store (again, when the environment moved it).
func (b *Backend) store() (*image.Store, error) {
	dir := b.imageStoreDir()
	b.images.mu.Lock()
	defer b.images.mu.Unlock()
	if b.images.store != nil && b.images.dir == dir {
		return b.images.store, nil
	}
	l := b.opts.imageLimits
	s, err := image.Open(dir, image.Options{Insecure: b.opts.insecure, Limits: image.Limits{
		MaxLayerBytes: l.MaxLayerBytes, MaxLayerUnpackedBytes: l.MaxLayerUnpackedBytes, MaxImageBytes: l.MaxImageBytes, MaxLayers: l.MaxLayers}})
	if err != nil {
		return nil, fmt.Errorf("image store: %w", err)
	}
	if b.images.store != nil {
		_ = b.images.store.Close()
	}
	b.images.store, b.images.dir = s, dir
	return s, nil
}

func (b *Backend) closeImages() error {
	b.images.mu.Lock()
	defer b.images.mu.Unlock()
	if b.images.store == nil {
		return nil
	}
	err := b.images.store.Close()
	b.images.store = nil
	return err
}

// imageError maps a store error to the library's kinds: what the reference or the image itself
// gets wrong is the document's problem; the rest is the host's.
func imageError(op, cellID string, err error) error {
	var ee *cellos.Error
	if errors.As(err, &ee) {
		return err
	}
	kind := cellos.ErrHost
	for _, k := range []error{image.ErrNotFound, image.ErrDigestMismatch, image.ErrTooLarge, image.ErrMediaType, image.ErrInsecure, image.ErrUnsafe} {
		if errors.Is(err, k) {
			kind = cellos.ErrInvalidSpec
		}
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		kind = cellos.ErrHost
	}
	return cellos.NewError(op, cellID, kind, err)
}

func toInfo(img *image.Image) ImageInfo {
	return ImageInfo{Ref: img.Ref, Digest: img.Digest, Layers: len(img.Layers), Size: img.Size, Pulled: img.Pulled}
}

// Pull fetches ref ("REGISTRY/REPO:TAG", "...@sha256:HEX" or "oci-layout:DIR[:TAG]") into the
// image store, verifying every blob's digest, and unpacks the layers it does not have. A tag is
// resolved again at every Pull. Concurrent pulls of one image fetch each blob once.
func (b *Backend) Pull(ctx context.Context, ref string, opts ...PullOption) (ImageInfo, error) {
	const op = "pull"
	var po pullOptions
	for _, o := range opts {
		o(&po)
	}
	r, err := image.ParseRef(ref)
	if err != nil {
		return ImageInfo{}, cellos.NewError(op, "", cellos.ErrInvalidSpec, err)
	}
	if err := b.checkLayoutRef(r); err != nil {
		return ImageInfo{}, cellos.NewError(op, "", cellos.ErrInvalidSpec, err)
	}
	s, err := b.store()
	if err != nil {
		return ImageInfo{}, cellos.NewError(op, "", cellos.ErrHost, err)
	}
	img, err := s.Pull(ctx, r, progressFunc(po.progress))
	if err != nil {
		return ImageInfo{}, imageError(op, "", err)
	}
	b.log.Info("image pulled", zap.String("ref", ref), zap.String("digest", img.Digest), zap.Int("layers", len(img.Layers)))
	return toInfo(img), nil
}

func progressFunc(f func(PullProgress)) func(image.Progress) {
	if f == nil {
		return nil
	}
	return func(p image.Progress) {
		f(PullProgress{Ref: p.Ref, Layers: p.Layers, Layer: p.Layer, Digest: p.Digest, Phase: p.Phase, LayerDone: p.LayerDone,
			Cached: p.Cached, Bytes: p.Done, Size: p.Total, Done: p.ImageDone, Total: p.ImageTotal})
	}
}

// Image describes ref as the store holds it, without pulling: ErrNotTracked when it is absent.
func (b *Backend) Image(ctx context.Context, ref string) (ImageInfo, error) {
	const op = "image"
	r, err := image.ParseRef(ref)
	if err != nil {
		return ImageInfo{}, cellos.NewError(op, "", cellos.ErrInvalidSpec, err)
	}
	s, err := b.store()
	if err != nil {
		return ImageInfo{}, cellos.NewError(op, "", cellos.ErrHost, err)
	}
	img, err := s.Get(ctx, r)
	if errors.Is(err, image.ErrNotFound) {
		return ImageInfo{}, cellos.NewError(op, "", cellos.ErrNotTracked, err)
	}
	if err != nil {
		return ImageInfo{}, imageError(op, "", err)
	}
	return toInfo(img), nil
}

// Images lists the images in the store, by reference.
func (b *Backend) Images(ctx context.Context) ([]ImageInfo, error) {
	s, err := b.store()
	if err != nil {
		return nil, cellos.NewError("images", "", cellos.ErrHost, err)
	}
	imgs, err := s.List(ctx)
	if err != nil {
		return nil, cellos.NewError("images", "", cellos.ErrHost, err)
	}
	out := make([]ImageInfo, len(imgs))
	for i := range imgs {
		out[i] = toInfo(&imgs[i])
	}
	return out, nil
}

// RemoveImage removes the name ref from the store (ErrNotTracked when it holds no such name).
// Cells running from the image keep running; its layers go at the next PruneImages that finds
// them unused.
func (b *Backend) RemoveImage(ctx context.Context, ref string) error {
	const op = "rmi"
	r, err := image.ParseRef(ref)
	if err != nil {
		return cellos.NewError(op, "", cellos.ErrInvalidSpec, err)
	}
	s, err := b.store()
	if err != nil {
		return cellos.NewError(op, "", cellos.ErrHost, err)
	}
	if err := s.Remove(ctx, r); err != nil {
		if errors.Is(err, image.ErrNotFound) {
			return cellos.NewError(op, "", cellos.ErrNotTracked, err)
		}
		return cellos.NewError(op, "", cellos.ErrHost, err)
	}
	return nil
}

// PruneImages removes the layers and blobs no image name refers to, except those running cells
// use (mounted as a cell's root, or held by a Create under way, in any process).
func (b *Backend) PruneImages(ctx context.Context) (ImagePruneReport, error) {
	s, err := b.store()
	if err != nil {
		return ImagePruneReport{}, cellos.NewError("image-prune", "", cellos.ErrHost, err)
	}
	r, err := s.GC(ctx)
	if err != nil {
		return ImagePruneReport{}, cellos.NewError("image-prune", "", cellos.ErrHost, err)
	}
	return ImagePruneReport{Layers: r.Layers, Blobs: r.Blobs, Bytes: r.Bytes, InUse: r.InUse}, nil
}

// checkLayoutRef refuses an OCI layout inside the directories the library protects, or outside
// the operator's allowed bind sources.
func (b *Backend) checkLayoutRef(r image.Ref) error {
	dir, _, ok := r.Layout()
	if !ok {
		return nil
	}
	src := resolve(dir)
	if p := overlapsProtected(src, protectedDirs(b.locate(), b.imageStoreDir())); p != "" {
		return fmt.Errorf("the OCI layout %q overlaps %s, which the library protects from cells", dir, p)
	}
	// A layout is host files a document names, as a bind source is: the same allow list holds.
	if len(b.opts.bindSources) > 0 && !allowedSource(src, b.opts.bindSources) {
		return fmt.Errorf("the OCI layout %q is not below the allowed bind sources %v (WithBindSources)", dir, b.opts.bindSources)
	}
	return nil
}

// imageCell is what an image gives a cell: its resolved document and the layers to mount.
type imageCell struct {
	doc     *cellos.ExecutionCellDocument
	layers  []string
	digest  string // hex of the manifest's sha256
	release func()
}

// useImage resolves the image of doc's root: pulled when the store does not have it (and pull is
// set), protected from PruneImages until release, and its config applied to a copy of the
// document (imageRun). The copy is validated again: the image's config is input too.
func (b *Backend) useImage(ctx context.Context, op string, doc *cellos.ExecutionCellDocument, pull bool) (*imageCell, error) {
	s := &doc.Spec
	ref := s.Rootfs.Image
	field := func(err error) error {
		return cellos.NewError(op, s.ID, cellos.ErrInvalidSpec, cellos.FieldError{Field: "spec.rootfs.image", Reason: err.Error()})
	}
	r, err := image.ParseRef(ref)
	if err != nil {
		return nil, field(err)
	}
	if err := b.checkLayoutRef(r); err != nil {
		return nil, field(err)
	}
	st, err := b.store()
	if err != nil {
		return nil, cellos.NewError(op, s.ID, cellos.ErrHost, err)
	}
	img, release, err := st.Use(ctx, r, pull, nil)
	if err != nil {
		if errors.Is(err, image.ErrNotFound) && !pull {
			return nil, field(fmt.Errorf("%s is not in the image store (%s): pull it first", ref, st.Dir()))
		}
		if e := imageError(op, s.ID, err); errors.Is(e, cellos.ErrInvalidSpec) {
			return nil, field(err)
		}
		return nil, cellos.NewError(op, s.ID, cellos.ErrHost, fmt.Errorf("the image %s: %w", ref, err))
	}
	run, err := imageRun(s.Run, img.Config.Config, img.Layers, ref)
	if err != nil {
		release()
		return nil, cellos.NewError(op, s.ID, cellos.ErrInvalidSpec, err)
	}
	cp := *doc
	cp.Spec.Run = run
	if err := cp.Validate(); err != nil {
		release()
		var ee *cellos.Error
		if errors.As(err, &ee) {
			return nil, cellos.NewError(op, s.ID, cellos.ErrInvalidSpec, fmt.Errorf("with the config of the image %s: %w", ref, ee.Err))
		}
		return nil, cellos.NewError(op, s.ID, cellos.ErrInvalidSpec, err)
	}
	return &imageCell{doc: &cp, layers: img.Layers, digest: strings.TrimPrefix(img.Digest, "sha256:"), release: release}, nil
}
