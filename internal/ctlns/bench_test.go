package ctlns

import (
	"os/exec"
	"path/filepath"
	"testing"
)

// BenchmarkCreateRemove is the per-cell cost of a control namespace.
func BenchmarkCreateRemove(b *testing.B) {
	needRoot(b)
	pin := filepath.Join(b.TempDir(), "control.netns")
	for b.Loop() {
		if err := Create(pin); err != nil {
			b.Fatal(err)
		}
		if err := Remove(pin); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkStart and BenchmarkPlainStart compare starting (and reaping) /bin/true inside a pin
// with starting it plainly.
func BenchmarkStart(b *testing.B) {
	needRoot(b)
	pin := filepath.Join(b.TempDir(), "control.netns")
	if err := Create(pin); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = Remove(pin) })
	for b.Loop() {
		if err := Run(exec.Command("/bin/true"), pin); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkPlainStart(b *testing.B) {
	for b.Loop() {
		if err := exec.Command("/bin/true").Run(); err != nil {
			b.Fatal(err)
		}
	}
}
