package image

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/internal/layer"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
)

// Errors of pulls, matched with errors.Is.
var (
	ErrNotFound       = errors.New("image not found")
	ErrDigestMismatch = errors.New("digest mismatch")
	ErrTooLarge       = errors.New("image too large")
	ErrMediaType      = errors.New("unsupported media type")
	ErrInsecure       = errors.New("registry not allowed over plain HTTP")
	ErrUnsafe         = layer.ErrUnsafe // a layer entry that escapes the layer or is forbidden
)

// Limits bound a pull; zero fields take the defaults.
type Limits struct {
	MaxLayerBytes         int64 // compressed, per layer (default 2 GiB)
	MaxLayerUnpackedBytes int64 // per layer (default 8 GiB)
	MaxImageBytes         int64 // compressed, all layers (default 16 GiB)
	MaxLayers             int   // default 128
}

func (l Limits) withDefaults() Limits {
	if l.MaxLayerBytes == 0 {
		l.MaxLayerBytes = 2 << 30
	}
	if l.MaxLayerUnpackedBytes == 0 {
		l.MaxLayerUnpackedBytes = 8 << 30
	}
	if l.MaxImageBytes == 0 {
		l.MaxImageBytes = 16 << 30
	}
	if l.MaxLayers == 0 {
		l.MaxLayers = 128
	}
	return l
}

// Options configure a Store.
type Options struct {
	Insecure  []string          // registries (host or host:port) that may be reached over plain HTTP
	Limits    Limits            // bounds on pulls
	Keychain  authn.Keychain    // nil: the docker configuration and its credential helpers
	Transport http.RoundTripper // nil: remote.DefaultTransport
}

// Store is an image store. It is safe for concurrent use, and for use by several processes.
type Store struct {
	dir                      *owned.Dir
	blobs, layers, refs, tmp *owned.Dir
	opts                     Options
	limits                   Limits
	flights                  singleflight.Group
}

// Image is an image of the store.
type Image struct {
	Ref    string
	Digest string // "sha256:HEX" of the manifest
	Config v1.ConfigFile
	Layers []string // the unpacked layers' directories, lowest first
	Size   int64    // unpacked bytes of all layers
	Pulled time.Time
}

// Progress is one event of a pull.
type Progress struct {
	Ref               string
	Layers            int
	Layer             int // 1-based; 0 for an event of the whole image
	Digest            string
	Phase             string // "resolve", "download", "unpack", "done"
	Done, Total       int64  // this layer's compressed bytes fetched, and its size
	LayerDone, Cached bool
	ImageDone         int64 // compressed bytes of all layers fetched or found in the store
	ImageTotal        int64
}

// GCReport says what GC removed and kept.
type GCReport struct {
	Layers, Blobs int
	Bytes         int64
	InUse         int // layers kept because a cell uses them
}

const (
	maxManifest = 4 << 20
	maxConfig   = 8 << 20
	maxRef      = 64 << 10
)

// Open opens the store at dir, creating it (0711) when it does not exist, under the ownership
// rule of the library's directories.
func Open(dir string, opts Options) (*Store, error) {
	d, err := owned.Ensure(dir, 0o711)
	if err != nil {
		return nil, err
	}
	s := &Store{dir: d, opts: opts, limits: opts.Limits.withDefaults()}
	sub := func(parent *owned.Dir, name string) (*owned.Dir, error) {
		sd, err := parent.Mkdir(name, 0o711)
		if errors.Is(err, fs.ErrExist) {
			return parent.OpenDir(name)
		}
		return sd, err
	}
	blobs, err := sub(d, "blobs")
	if err == nil {
		s.blobs, err = sub(blobs, "sha256")
		blobs.Close()
	}
	if err == nil {
		s.layers, err = sub(d, "layers")
	}
	if err == nil {
		s.refs, err = sub(d, "refs")
	}
	if err == nil {
		s.tmp, err = sub(d, "tmp")
	}
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("image store %s: %w", dir, err)
	}
	return s, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir.Path() }

// Close releases the store's descriptors.
func (s *Store) Close() error {
	for _, d := range []*owned.Dir{s.blobs, s.layers, s.refs, s.tmp, s.dir} {
		if d != nil {
			d.Close()
		}
	}
	return nil
}

// lock takes the store's lock, shared or exclusive, waiting within ctx.
func (s *Store) lock(ctx context.Context, exclusive bool) (func(), error) {
	f, err := s.dir.OpenFile("lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking the image store: %w", err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// refRecord is a name of the store.
type refRecord struct {
	Ref    string    `json:"ref"`
	Digest string    `json:"digest"`
	Pulled time.Time `json:"pulled"`
}

func refFile(ref string) string {
	sum := sha256.Sum256([]byte(ref))
	return hex.EncodeToString(sum[:])
}

// Get returns the image ref names, from the store only.
func (s *Store) Get(ctx context.Context, ref Ref) (*Image, error) {
	data, err := s.refs.ReadFile(refFile(ref.String()), maxRef)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w in the store %s", ref, ErrNotFound, s.Dir())
	}
	if err != nil {
		return nil, err
	}
	var rec refRecord
	if err := json.Unmarshal(data, &rec); err != nil || rec.Ref != ref.String() {
		return nil, fmt.Errorf("%s: the store's record of it is damaged: %v", ref, err)
	}
	return s.load(rec)
}

// load reads the image a name record gives.
func (s *Store) load(rec refRecord) (*Image, error) {
	_, cfg, err := s.manifestAndConfig(rec)
	if err != nil {
		return nil, err
	}
	img := &Image{Ref: rec.Ref, Digest: rec.Digest, Config: *cfg, Pulled: rec.Pulled}
	for _, d := range cfg.RootFS.DiffIDs {
		if d.Algorithm != "sha256" {
			return nil, fmt.Errorf("%s: diff id %s: %w", rec.Ref, d, ErrMediaType)
		}
		ld, err := s.layers.OpenDir(d.Hex)
		if err != nil {
			return nil, fmt.Errorf("%s: layer %s is missing from the store (pull the image again): %w", rec.Ref, d, ErrNotFound)
		}
		if size, err := ld.ReadFile("size", 64); err == nil {
			n, _ := strconv.ParseInt(strings.TrimSpace(string(size)), 10, 64)
			img.Size += n
		}
		ld.Close()
		img.Layers = append(img.Layers, filepath.Join(s.layers.Path(), d.Hex, "fs"))
	}
	return img, nil
}

// manifestAndConfig reads the manifest and the config of the image a name record gives, each
// checked against its digest.
func (s *Store) manifestAndConfig(rec refRecord) (*v1.Manifest, *v1.ConfigFile, error) {
	h, err := v1.NewHash(rec.Digest)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: the store's record of it is damaged: %w", rec.Ref, err)
	}
	raw, err := s.readBlob(h, maxManifest)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: manifest: %w", rec.Ref, err)
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, nil, fmt.Errorf("%s: manifest: %w", rec.Ref, err)
	}
	rawCfg, err := s.readBlob(m.Config.Digest, maxConfig)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: config: %w", rec.Ref, err)
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(rawCfg))
	if err != nil {
		return nil, nil, fmt.Errorf("%s: config: %w", rec.Ref, err)
	}
	return m, cfg, nil
}

// readBlob reads a blob of the store and checks its digest.
func (s *Store) readBlob(h v1.Hash, max int64) ([]byte, error) {
	if h.Algorithm != "sha256" || len(h.Hex) != 64 {
		return nil, fmt.Errorf("%s: %w", h, ErrMediaType)
	}
	data, err := s.blobs.ReadFile(h.Hex, max)
	if err != nil {
		return nil, err
	}
	if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != h.Hex {
		return nil, fmt.Errorf("the store's blob %s: %w", h, ErrDigestMismatch)
	}
	return data, nil
}

func (s *Store) writeBlob(h v1.Hash, data []byte) error {
	return s.place(data, s.blobs, h.Hex, false)
}

// place writes data as the file name of dir: written in tmp/ under a name of its own, then
// renamed into place, replacing what is there when replace is set. Content-addressed files are
// never replaced: one already there (written by another pull) has the same content.
func (s *Store) place(data []byte, dir *owned.Dir, name string, replace bool) error {
	work, err := s.tmp.MkdirTemp("file-", 0o700)
	if err != nil {
		return err
	}
	wname := filepath.Base(work.Path())
	defer func() {
		work.Close()
		_ = s.tmp.RemoveAll(wname)
	}()
	if err := work.WriteFile("f", data, 0o644); err != nil {
		return err
	}
	if !replace {
		err := work.Rename("f", dir, name)
		if errors.Is(err, fs.ErrExist) {
			return nil
		}
		return err
	}
	if err := unix.Renameat(work.Fd(), "f", dir.Fd(), name); err != nil {
		return &fs.PathError{Op: "rename", Path: filepath.Join(dir.Path(), name), Err: err}
	}
	return nil
}

// Use returns the image ref names, pulling it first when the store lacks it and pull is set, and
// keeps GC from removing its layers until release is called.
func (s *Store) Use(ctx context.Context, ref Ref, pull bool, progress func(Progress)) (*Image, func(), error) {
	unlock, err := s.lock(ctx, false)
	if err != nil {
		return nil, nil, err
	}
	img, err := s.Get(ctx, ref)
	if errors.Is(err, ErrNotFound) && pull {
		img, err = s.pull(ctx, ref, progress)
	}
	if err != nil {
		unlock()
		return nil, nil, err
	}
	var once sync.Once
	return img, func() { once.Do(unlock) }, nil
}

// Pull fetches ref into the store (a tag is resolved again) and returns the image.
func (s *Store) Pull(ctx context.Context, ref Ref, progress func(Progress)) (*Image, error) {
	unlock, err := s.lock(ctx, false)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return s.pull(ctx, ref, progress)
}

// List returns the store's images, by name.
func (s *Store) List(ctx context.Context) ([]Image, error) {
	names, err := s.refs.Entries()
	if err != nil {
		return nil, err
	}
	var out []Image
	for _, n := range names {
		data, err := s.refs.ReadFile(n, maxRef)
		if err != nil {
			continue
		}
		var rec refRecord
		if json.Unmarshal(data, &rec) != nil || refFile(rec.Ref) != n {
			continue
		}
		img, err := s.load(rec)
		if err != nil {
			continue
		}
		out = append(out, *img)
	}
	slices.SortFunc(out, func(a, b Image) int { return strings.Compare(a.Ref, b.Ref) })
	return out, nil
}

// Remove removes the name ref; the layers stay until GC.
func (s *Store) Remove(ctx context.Context, ref Ref) error {
	err := s.refs.Remove(refFile(ref.String()))
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s: %w in the store %s", ref, ErrNotFound, s.Dir())
	}
	return err
}

// GC removes the blobs and layers no name refers to, except layers in use: mounted (an overlay
// in this mount namespace names them) or held by a Use or a pull (in any process: they hold the
// store's lock shared, GC takes it exclusive).
func (s *Store) GC(ctx context.Context) (GCReport, error) {
	var rep GCReport
	unlock, err := s.lock(ctx, true)
	if err != nil {
		return rep, err
	}
	defer unlock()
	keepBlobs, keepLayers := map[string]bool{}, map[string]bool{}
	names, err := s.refs.Entries()
	if err != nil {
		return rep, err
	}
	for _, n := range names {
		data, err := s.refs.ReadFile(n, maxRef)
		if err != nil {
			return rep, err
		}
		var rec refRecord
		if json.Unmarshal(data, &rec) != nil {
			continue
		}
		if h, err := v1.NewHash(rec.Digest); err == nil {
			keepBlobs[h.Hex] = true
		}
		m, cfg, err := s.manifestAndConfig(rec)
		if err != nil { // delete nothing rather than what a name might still need
			return rep, fmt.Errorf("not pruning: %w (remove the name first)", err)
		}
		keepBlobs[m.Config.Digest.Hex] = true
		for _, d := range cfg.RootFS.DiffIDs {
			keepLayers[d.Hex] = true
		}
	}
	mounted, err := s.mountedLayers()
	if err != nil {
		return rep, err
	}
	blobs, err := s.blobs.Entries()
	if err != nil {
		return rep, err
	}
	for _, b := range blobs {
		if keepBlobs[b] {
			continue
		}
		if st, err := s.blobs.Lstat(b); err == nil {
			rep.Bytes += st.Size
		}
		if err := s.blobs.Remove(b); err != nil {
			return rep, err
		}
		rep.Blobs++
	}
	layers, err := s.layers.Entries()
	if err != nil {
		return rep, err
	}
	for _, l := range layers {
		if keepLayers[l] {
			continue
		}
		if mounted[l] {
			rep.InUse++
			continue
		}
		if ld, err := s.layers.OpenDir(l); err == nil {
			if size, err := ld.ReadFile("size", 64); err == nil {
				n, _ := strconv.ParseInt(strings.TrimSpace(string(size)), 10, 64)
				rep.Bytes += n
			}
			ld.Close()
		}
		if err := s.layers.RemoveAll(l); err != nil {
			return rep, err
		}
		rep.Layers++
	}
	tmp, err := s.tmp.Entries()
	if err != nil {
		return rep, err
	}
	for _, t := range tmp { // no pull holds the lock: what is here is left from a crash
		if err := s.tmp.RemoveAll(t); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// mountedLayers are the layers an overlay of this mount namespace names.
func (s *Store) mountedLayers() (map[string]bool, error) {
	ms, err := mountinfo.GetMounts(mountinfo.FSTypeFilter("overlay"))
	if err != nil {
		return nil, err
	}
	prefix := s.layers.Path() + "/"
	out := map[string]bool{}
	for _, m := range ms {
		opts := m.VFSOptions
		for {
			i := strings.Index(opts, prefix)
			if i < 0 {
				break
			}
			rest := opts[i+len(prefix):]
			if len(rest) >= 64 {
				out[rest[:64]] = true
			}
			opts = rest
		}
	}
	return out, nil
}

// insecureTransport refuses plain HTTP to registries not named insecure.
type insecureTransport struct {
	next    http.RoundTripper
	allowed []string
}

func (t *insecureTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme == "http" && !slices.Contains(t.allowed, req.URL.Host) {
		return nil, fmt.Errorf("%s: %w (name it an insecure registry to allow it)", req.URL.Host, ErrInsecure)
	}
	return t.next.RoundTrip(req)
}

// source is where an image comes from: a registry or an OCI layout.
func (s *Store) resolve(ctx context.Context, ref Ref) (v1.Image, error) {
	platform := v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	if dir, tag, ok := ref.Layout(); ok {
		idx, err := layout.ImageIndexFromPath(dir)
		if err != nil {
			return nil, fmt.Errorf("%s: reading the OCI layout: %w", ref, err)
		}
		return fromIndex(ref, idx, platform, func(d v1.Descriptor) bool {
			return d.Annotations["org.opencontainers.image.ref.name"] == tag
		}, "tag "+tag)
	}
	r := ref.registry
	if slices.Contains(s.opts.Insecure, r.Context().RegistryStr()) {
		var err error
		if r, err = name.ParseReference(ref.String(), name.Insecure); err != nil {
			return nil, err
		}
	}
	next := s.opts.Transport
	if next == nil {
		next = remote.DefaultTransport
	}
	kc := s.opts.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	opts := []remote.Option{remote.WithContext(ctx), remote.WithAuthFromKeychain(kc),
		remote.WithTransport(&insecureTransport{next: next, allowed: s.opts.Insecure}), remote.WithPlatform(platform)}
	desc, err := remote.Get(r, opts...)
	if err != nil {
		return nil, classify(fmt.Errorf("%s: %w", ref, err))
	}
	if d, ok := r.(name.Digest); ok {
		if sum := sha256.Sum256(desc.Manifest); "sha256:"+hex.EncodeToString(sum[:]) != d.DigestStr() {
			return nil, fmt.Errorf("%s: the manifest served is not %s: %w", ref, d.DigestStr(), ErrDigestMismatch)
		}
	}
	switch desc.MediaType {
	case types.OCIManifestSchema1, types.DockerManifestSchema2:
		return desc.Image()
	case types.OCIImageIndex, types.DockerManifestList:
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, classify(fmt.Errorf("%s: %w", ref, err))
		}
		return fromIndex(ref, idx, platform, func(v1.Descriptor) bool { return true }, "")
	default:
		return nil, fmt.Errorf("%s: the manifest's media type %q is not an image's: %w", ref, desc.MediaType, ErrMediaType)
	}
}

// fromIndex picks the image of an index that match selects, for platform when there are several.
func fromIndex(ref Ref, idx v1.ImageIndex, platform v1.Platform, match func(v1.Descriptor) bool, what string) (v1.Image, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	var found []v1.Descriptor
	for _, d := range im.Manifests {
		if match(d) {
			found = append(found, d)
		}
	}
	if len(found) == 0 {
		return nil, fmt.Errorf("%s: no %s in the OCI layout: %w", ref, what, ErrNotFound)
	}
	for _, d := range found {
		switch d.MediaType {
		case types.OCIImageIndex, types.DockerManifestList:
			inner, err := idx.ImageIndex(d.Digest)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", ref, err)
			}
			return fromIndex(ref, inner, platform, func(v1.Descriptor) bool { return true }, "")
		case types.OCIManifestSchema1, types.DockerManifestSchema2:
			if len(found) == 1 || d.Platform == nil || d.Platform.Satisfies(platform) {
				return idx.Image(d.Digest)
			}
		default:
			return nil, fmt.Errorf("%s: the manifest's media type %q is not an image's: %w", ref, d.MediaType, ErrMediaType)
		}
	}
	return nil, fmt.Errorf("%s: no image for %s/%s: %w", ref, platform.OS, platform.Architecture, ErrNotFound)
}

// classify gives a registry's error the store's kind.
func classify(err error) error {
	msg := err.Error()
	switch {
	case errors.Is(err, ErrInsecure) || strings.Contains(msg, ErrInsecure.Error()):
		if !errors.Is(err, ErrInsecure) {
			return fmt.Errorf("%w: %w", ErrInsecure, err)
		}
	case strings.Contains(msg, "does not match requested digest") || strings.Contains(msg, "error verifying"):
		return fmt.Errorf("%w: %w", ErrDigestMismatch, err)
	case strings.Contains(msg, "MANIFEST_UNKNOWN") || strings.Contains(msg, "NAME_UNKNOWN") || strings.Contains(msg, "404"):
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	case strings.Contains(msg, "media type"):
		return fmt.Errorf("%w: %w", ErrMediaType, err)
	}
	return err
}

var layerMediaTypes = []types.MediaType{types.OCILayer, types.OCILayerZStd, types.OCIRestrictedLayer, types.OCIUncompressedLayer,
	types.OCIUncompressedRestrictedLayer, types.DockerLayer, types.DockerForeignLayer, types.DockerUncompressedLayer}

// pull fetches ref; the caller holds the lock shared. Concurrent pulls of one name in this
// process share one pull (the first one's progress is the one reported).
func (s *Store) pull(ctx context.Context, ref Ref, progress func(Progress)) (*Image, error) {
	for {
		v, err, shared := s.flights.Do("ref:"+ref.String(), func() (any, error) { return s.pullOnce(ctx, ref, progress) })
		if err != nil && shared && ctx.Err() == nil && stopped(err) {
			continue // the pull this one shared was another caller's, which stopped it: pull again
		}
		if err != nil {
			return nil, err
		}
		return v.(*Image), nil
	}
}

// errStopped marks a pull ended by its caller's context.
var errStopped = errors.New("pull stopped")

// stopped reports whether err ended a pull because its caller's context ended.
func stopped(err error) bool {
	return errors.Is(err, errStopped) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

func (s *Store) pullOnce(ctx context.Context, ref Ref, progress func(Progress)) (*Image, error) {
	report := func(p Progress) {
		if progress != nil {
			p.Ref = ref.String()
			progress(p)
		}
	}
	img, err := s.resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	raw, err := img.RawManifest()
	if err != nil {
		return nil, classify(fmt.Errorf("%s: manifest: %w", ref, err))
	}
	if len(raw) > maxManifest {
		return nil, fmt.Errorf("%s: manifest of %d bytes: %w", ref, len(raw), ErrTooLarge)
	}
	sum := sha256.Sum256(raw)
	digest := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("%s: manifest: %w", ref, err)
	}
	if m.Config.MediaType != "" && m.Config.MediaType != types.OCIConfigJSON && m.Config.MediaType != types.DockerConfigJSON {
		return nil, fmt.Errorf("%s: the config's media type %q is not an image config's: %w", ref, m.Config.MediaType, ErrMediaType)
	}
	if m.Config.Size > maxConfig {
		return nil, fmt.Errorf("%s: config of %d bytes: %w", ref, m.Config.Size, ErrTooLarge)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return nil, classify(fmt.Errorf("%s: config: %w", ref, err))
	}
	if cs := sha256.Sum256(rawCfg); hex.EncodeToString(cs[:]) != m.Config.Digest.Hex || m.Config.Digest.Algorithm != "sha256" {
		return nil, fmt.Errorf("%s: config: %s: %w", ref, m.Config.Digest, ErrDigestMismatch)
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(rawCfg))
	if err != nil {
		return nil, fmt.Errorf("%s: config: %w", ref, err)
	}
	if cfg.OS != "" && cfg.OS != "linux" {
		return nil, fmt.Errorf("%s: an image for %s, not linux: %w", ref, cfg.OS, ErrMediaType)
	}
	if len(m.Layers) != len(cfg.RootFS.DiffIDs) {
		return nil, fmt.Errorf("%s: %d layers but %d diff ids in the config: %w", ref, len(m.Layers), len(cfg.RootFS.DiffIDs), ErrDigestMismatch)
	}
	if len(m.Layers) > s.limits.MaxLayers {
		return nil, fmt.Errorf("%s: %d layers, the limit is %d: %w", ref, len(m.Layers), s.limits.MaxLayers, ErrTooLarge)
	}
	var total int64
	for i, l := range m.Layers {
		if !slices.Contains(layerMediaTypes, l.MediaType) {
			return nil, fmt.Errorf("%s: layer %d has the media type %q, not a layer's: %w", ref, i+1, l.MediaType, ErrMediaType)
		}
		if d := cfg.RootFS.DiffIDs[i]; d.Algorithm != "sha256" || len(d.Hex) != 64 || l.Digest.Algorithm != "sha256" {
			return nil, fmt.Errorf("%s: layer %d: digests must be sha256: %w", ref, i+1, ErrMediaType)
		}
		if l.Size > s.limits.MaxLayerBytes {
			return nil, fmt.Errorf("%s: layer %d (%s) is %d bytes, over the limit of %d: %w", ref, i+1, l.Digest, l.Size, s.limits.MaxLayerBytes, ErrTooLarge)
		}
		total += max(l.Size, 0)
	}
	if total > s.limits.MaxImageBytes {
		return nil, fmt.Errorf("%s: %d bytes of layers, over the limit of %d: %w", ref, total, s.limits.MaxImageBytes, ErrTooLarge)
	}
	report(Progress{Phase: "resolve", Layers: len(m.Layers), ImageTotal: total})

	var (
		mu      sync.Mutex
		done    int64
		wg      sync.WaitGroup
		errs    = make([]error, len(m.Layers))
		lctx, c = context.WithCancel(ctx)
	)
	defer c()
	for i, l := range m.Layers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			diff := cfg.RootFS.DiffIDs[i]
			ev := func(p Progress, delta int64) {
				mu.Lock()
				done += delta
				p.Layers, p.Layer, p.Digest, p.Total, p.ImageDone, p.ImageTotal = len(m.Layers), i+1, l.Digest.String(), l.Size, done, total
				mu.Unlock()
				report(p)
			}
			cached, err := s.fetchLayer(lctx, img, l, diff, func(n, delta int64) { ev(Progress{Phase: "download", Done: n}, delta) },
				func() { ev(Progress{Phase: "unpack", Done: l.Size}, 0) })
			if err != nil {
				errs[i] = fmt.Errorf("%s: layer %d (%s): %w", ref, i+1, l.Digest, err)
				c()
				return
			}
			delta := int64(0)
			if cached {
				delta = l.Size
			}
			ev(Progress{Phase: "done", Done: l.Size, LayerDone: true, Cached: cached}, delta)
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		return nil, fmt.Errorf("%s: %w: %w", ref, errStopped, context.Cause(ctx))
	}
	for _, err := range errs {
		if err != nil && !errors.Is(err, context.Canceled) { // the first layer's error, not the others' stops
			return nil, err
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := s.writeBlob(digest, raw); err != nil {
		return nil, err
	}
	if err := s.writeBlob(m.Config.Digest, rawCfg); err != nil {
		return nil, err
	}
	rec := refRecord{Ref: ref.String(), Digest: digest.String(), Pulled: time.Now().UTC()}
	data, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	if err := s.place(data, s.refs, refFile(rec.Ref), true); err != nil {
		return nil, err
	}
	out, err := s.load(rec)
	if err != nil {
		return nil, err
	}
	report(Progress{Phase: "done", Layers: len(m.Layers), ImageDone: total, ImageTotal: total})
	return out, nil
}

// fetchLayer makes layers/DIFF, unless it is there: one fetch per layer in this process at a time.
func (s *Store) fetchLayer(ctx context.Context, img v1.Image, desc v1.Descriptor, diff v1.Hash, downloaded func(n, delta int64), unpacking func()) (cached bool, err error) {
	if _, err := s.layers.Lstat(diff.Hex); err == nil {
		return true, nil
	}
	for {
		v, err, shared := s.flights.Do("layer:"+diff.Hex, func() (any, error) {
			if _, err := s.layers.Lstat(diff.Hex); err == nil {
				return true, nil // made by a flight that ended since the check above
			}
			return false, s.makeLayer(ctx, img, desc, diff, downloaded, unpacking)
		})
		if err != nil && shared && ctx.Err() == nil && stopped(err) {
			continue // another pull's fetch, stopped by its caller
		}
		if err != nil {
			return false, err
		}
		return v.(bool), nil
	}
}

// makeLayer downloads, verifies and unpacks one layer into tmp/, then moves it into layers/.
func (s *Store) makeLayer(ctx context.Context, img v1.Image, desc v1.Descriptor, diff v1.Hash, downloaded func(n, delta int64), unpacking func()) error {
	work, err := s.tmp.MkdirTemp("layer-", 0o711)
	if err != nil {
		return err
	}
	name := filepath.Base(work.Path())
	defer func() {
		work.Close()
		_ = s.tmp.RemoveAll(name)
	}()
	// Download, bounded, hashing as the bytes arrive.
	bl, err := img.LayerByDigest(desc.Digest)
	if err != nil {
		return classify(err)
	}
	rc, err := bl.Compressed()
	if err != nil {
		return classify(err)
	}
	f, err := work.OpenFile("blob", os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		rc.Close()
		return err
	}
	defer f.Close()
	h := sha256.New()
	w := &capWriter{w: io.MultiWriter(f, h), max: s.limits.MaxLayerBytes, progress: downloaded}
	_, err = io.Copy(w, ctxReader{ctx, rc})
	rc.Close()
	if err != nil {
		return classify(err)
	}
	if w.n > w.last {
		downloaded(w.n, w.n-w.last)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != desc.Digest.Hex {
		return fmt.Errorf("the blob served has the digest sha256:%s: %w", got, ErrDigestMismatch)
	}
	if w.n != desc.Size {
		return fmt.Errorf("the blob served has %d bytes, the manifest says %d: %w", w.n, desc.Size, ErrDigestMismatch)
	}
	// Unpack the verified blob, checking the uncompressed digest against the config's diff id.
	unpacking()
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	tr, closeTar, err := decompress(desc.MediaType, f)
	if err != nil {
		return err
	}
	defer closeTar()
	dh := sha256.New()
	fsd, err := work.Mkdir("fs", 0o755)
	if err != nil {
		return err
	}
	fsd.Close()
	st, err := layer.Apply(ctx, io.TeeReader(tr, dh), filepath.Join(work.Path(), "fs"), layer.Limits{MaxBytes: s.limits.MaxLayerUnpackedBytes})
	if err != nil {
		if errors.Is(err, layer.ErrTooLarge) {
			return fmt.Errorf("%w: %w (unpacked, the limit is %d bytes)", ErrTooLarge, err, s.limits.MaxLayerUnpackedBytes)
		}
		return err
	}
	if _, err := io.Copy(dh, tr); err != nil { // the tar's padding after its last entry
		return err
	}
	if got := hex.EncodeToString(dh.Sum(nil)); got != diff.Hex {
		return fmt.Errorf("the layer's uncompressed digest is sha256:%s, the config says %s: %w", got, diff, ErrDigestMismatch)
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := work.Remove("blob"); err != nil {
		return err
	}
	if err := work.WriteFile("size", []byte(strconv.FormatInt(st.Bytes, 10)), 0o644); err != nil {
		return err
	}
	err = s.tmp.Rename(name, s.layers, diff.Hex)
	if errors.Is(err, fs.ErrExist) {
		return nil // another process made it meanwhile; ours goes
	}
	return err
}

// decompress reads a layer blob as the tar stream it holds.
func decompress(mt types.MediaType, r io.Reader) (io.Reader, func(), error) {
	switch mt {
	case types.OCIUncompressedLayer, types.OCIUncompressedRestrictedLayer, types.DockerUncompressedLayer:
		return r, func() {}, nil
	case types.OCILayerZStd:
		zr, err := zstd.NewReader(r)
		if err != nil {
			return nil, nil, err
		}
		return zr, zr.Close, nil
	default:
		gr, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("the layer is not gzip: %w", err)
		}
		return gr, func() { gr.Close() }, nil
	}
}

// capWriter fails once more than max bytes were written.
type capWriter struct {
	w        io.Writer
	n, max   int64
	last     int64
	progress func(n, delta int64)
}

func (c *capWriter) Write(p []byte) (int, error) {
	if c.n+int64(len(p)) > c.max {
		return 0, fmt.Errorf("more than the limit of %d bytes: %w", c.max, ErrTooLarge)
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	if c.progress != nil && (c.n-c.last >= 256<<10 || err != nil) {
		c.progress(c.n, c.n-c.last)
		c.last = c.n
	}
	return n, err
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
