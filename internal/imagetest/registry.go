// Package imagetest serves OCI registries in the test process, on loopback, and builds the
// images tests pull from them: from the host's busybox and python3, or from entries given.
package imagetest

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Registry is a registry served on 127.0.0.1 for one test, with hooks to misbehave.
type Registry struct {
	srv *httptest.Server
	tls bool

	mu        sync.Mutex
	gets      int
	blobGets  map[string]int
	corrupt   map[string]bool
	manifests map[string]manifest // "repo:tag" → what to serve instead
	wrap      func(http.Handler) http.Handler
}

type manifest struct {
	mediaType string
	body      []byte
}

// Serve starts a plain-HTTP registry, stopped when the test ends.
func Serve(t testing.TB) *Registry { return serve(t, false) }

// ServeTLS starts a registry over HTTPS with a certificate of its own; Transport trusts it.
func ServeTLS(t testing.TB) *Registry { return serve(t, true) }

func serve(t testing.TB, useTLS bool) *Registry {
	r := &Registry{blobGets: map[string]int{}, corrupt: map[string]bool{}, manifests: map[string]manifest{}, tls: useTLS}
	inner := registry.New(registry.Logger(nopLogger()))
	h := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) { r.serveHTTP(inner, w, req) })
	if useTLS {
		r.srv = httptest.NewTLSServer(h)
	} else {
		r.srv = httptest.NewServer(h)
	}
	t.Cleanup(r.srv.Close)
	return r
}

func (r *Registry) serveHTTP(inner http.Handler, w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	wrap := r.wrap
	if req.Method == http.MethodGet {
		r.gets++
	}
	p := req.URL.Path
	var digest string
	if i := strings.Index(p, "/blobs/"); i >= 0 && req.Method == http.MethodGet {
		digest = path.Base(p)
		r.blobGets[digest]++
	}
	corrupt := digest != "" && r.corrupt[digest]
	var m *manifest
	if i := strings.Index(p, "/manifests/"); i >= 0 && strings.HasPrefix(p, "/v2/") {
		key := p[len("/v2/"):i] + ":" + p[i+len("/manifests/"):]
		if mm, ok := r.manifests[key]; ok {
			m = &mm
		}
	}
	r.mu.Unlock()
	var h http.Handler = inner
	switch {
	case m != nil:
		h = http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			w.Header().Set("Content-Type", m.mediaType)
			w.Header().Set("Content-Length", fmt.Sprint(len(m.body)))
			if req.Method != http.MethodHead {
				_, _ = w.Write(m.body)
			}
		})
	case corrupt:
		h = http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			rec := httptest.NewRecorder()
			inner.ServeHTTP(rec, req)
			body := rec.Body.Bytes()
			if len(body) > 0 {
				body = bytes.Clone(body)
				body[len(body)/2] ^= 0xff // same length, other bytes
			}
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			_, _ = w.Write(body)
		})
	}
	if wrap != nil {
		h = wrap(h)
	}
	h.ServeHTTP(w, req)
}

// Host is the registry's host:port.
func (r *Registry) Host() string {
	return strings.TrimPrefix(strings.TrimPrefix(r.srv.URL, "http://"), "https://")
}

// Transport is an HTTP transport that trusts the registry's certificate.
func (r *Registry) Transport() http.RoundTripper {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: r.srv.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs}
	return tr
}

// Push stores img as repo:tag and returns its reference.
func (r *Registry) Push(t testing.TB, repo, tag string, img v1.Image) string {
	t.Helper()
	ref := r.Host() + "/" + repo + ":" + tag
	if err := remote.Write(r.parse(t, ref), img, r.pushOptions()...); err != nil {
		t.Fatalf("pushing %s: %v", ref, err)
	}
	return ref
}

// PushIndex stores an index as repo:tag and returns its reference.
func (r *Registry) PushIndex(t testing.TB, repo, tag string, idx v1.ImageIndex) string {
	t.Helper()
	ref := r.Host() + "/" + repo + ":" + tag
	if err := remote.WriteIndex(r.parse(t, ref), idx, r.pushOptions()...); err != nil {
		t.Fatalf("pushing %s: %v", ref, err)
	}
	return ref
}

func (r *Registry) parse(t testing.TB, ref string) name.Reference {
	var opts []name.Option
	if !r.tls {
		opts = append(opts, name.Insecure)
	}
	n, err := name.ParseReference(ref, opts...)
	if err != nil {
		t.Fatalf("%s: %v", ref, err)
	}
	return n
}

func (r *Registry) pushOptions() []remote.Option {
	if r.tls {
		return []remote.Option{remote.WithTransport(r.Transport())}
	}
	return nil
}

// CorruptBlob makes the registry serve other bytes, of the same length, under digest.
func (r *Registry) CorruptBlob(digest string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.corrupt[digest] = true
}

// ServeManifest makes the registry answer repo:tag's manifest with body, of mediaType.
func (r *Registry) ServeManifest(repo, tag, mediaType string, body []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.manifests[repo+":"+tag] = manifest{mediaType, body}
}

// Wrap puts f around the registry's handler (to slow it down, to fail requests).
func (r *Registry) Wrap(f func(http.Handler) http.Handler) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.wrap = f
}

// Gets counts the GET requests the registry served.
func (r *Registry) Gets() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gets
}

// BlobGets counts the GET requests for the blob digest ("sha256:HEX").
func (r *Registry) BlobGets(digest string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.blobGets[digest]
}

// missing skips the test for want of a host tool, or fails it where the tests are mandatory.
func missing(t testing.TB, what string) {
	t.Helper()
	if os.Getenv("CELLOS_REQUIRE_RUNSC") == "1" {
		t.Fatalf("%s is missing on this host; make deps installs it", what)
	}
	t.Skipf("%s is missing on this host", what)
}
