package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"testing"
)

// FuzzApply feeds Apply arbitrary tar streams: it must never panic nor write beside the layer.
func FuzzApply(f *testing.F) {
	for _, seed := range [][]entry{
		{dir("d"), file("d/f", "x"), hardlink("d/l", "d/f"), symlink("d/s", "/etc")},
		{symlink("evil", "/"), file("evil/tmp/x", "pwned")},
		{symlink("up", ".."), file("up/x", "pwned")},
		{file("../x", "pwned"), file("/abs", "a")},
		{dir("d"), file("d/.wh..wh..opq", ""), file("d/.wh.gone", "")},
		{file("a", "1"), file("a", "2"), dir("a"), symlink("a", "b")},
		{{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "x", Mode: 0o755, Format: tar.FormatPAX,
			PAXRecords: map[string]string{"SCHILY.xattr.user.k": "v"}}}},
	} {
		f.Add(buildTar(f, seed...))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		parent, layer := sentinel(t)
		_, _ = Apply(context.Background(), bytes.NewReader(data), layer, Limits{MaxBytes: 1 << 20, MaxEntries: 1000})
		checkSentinel(t, parent)
	})
}
