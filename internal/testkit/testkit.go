// Package testkit holds what the project's tests share across packages: the real runsc they run
// against (or skip without, unless CELLOS_REQUIRE_RUNSC=1 makes that a failure) and a buffer safe
// for the writers of several goroutines. Only tests import it.
package testkit

import (
	"bytes"
	"os"
	"os/exec"
	"sync"
	"testing"
)

// Runsc returns the runsc under test: $CELLOS_GVISOR_RUNSC_BIN, else runsc on $PATH. Without one
// the test is skipped, or fails when CELLOS_REQUIRE_RUNSC=1 (set by CI and `make test`).
func Runsc(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("CELLOS_GVISOR_RUNSC_BIN")
	if bin == "" {
		bin = "runsc"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		if os.Getenv("CELLOS_REQUIRE_RUNSC") == "1" {
			t.Fatalf("runsc is required (CELLOS_REQUIRE_RUNSC=1) but not found: %v", err)
		}
		t.Skipf("runsc not found: %v", err)
	}
	return path
}

// Buffer is a bytes.Buffer that several goroutines may write to and read from.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

// String returns what was written so far.
func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// Len returns how many bytes were written so far.
func (s *Buffer) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Len()
}
