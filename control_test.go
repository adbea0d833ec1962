package gvisor_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

const unprivilegedEnv = "CELLOS_TEST_UNPRIVILEGED"

// TestHelperUnprivileged is a supervisor run as uid 65534 by TestControlSocketsWithoutRoot: it
// creates one cell on the bundle root it is given and prints how that went.
func TestHelperUnprivileged(t *testing.T) {
	mode := os.Getenv(unprivilegedEnv)
	if mode == "" {
		t.Skip("helper process")
	}
	opts := []gvisor.Option{gvisor.WithBundleRoot(os.Getenv("CELLOS_TEST_ROOT")), gvisor.WithSpareShim(false)}
	if mode == "accept" {
		opts = append(opts, gvisor.WithUnconfinedControlSockets(true))
	}
	b, err := gvisor.New(opts...)
	if err == nil {
		var h cellos.CellHandle
		if h, err = b.Create(context.Background(), sh("unpriv", "echo hi")); err == nil {
			var st cellos.ExitStatus
			st, err = b.WaitForExit(context.Background(), h.CellID)
			if err == nil {
				fmt.Printf("exited %d\n", st.Code)
			}
			_, _ = b.Destroy(context.Background(), h)
		}
		_ = b.Close(context.Background())
	}
	if err != nil {
		fmt.Printf("error: %v\n", err)
	}
	os.Exit(0)
}

// Without root the library cannot confine runsc's abstract control sockets to a namespace of the
// cell's: it refuses cells on a runsc that serves them (Debian's), unless the operator accepts
// the exposure; a runsc with file sockets in the state root (current) needs nothing.
func TestControlSocketsWithoutRoot(t *testing.T) {
	bin := requireRunsc(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the helper as another user")
	}
	pub, err := os.MkdirTemp("", "cellos-unpriv-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(pub) })
	require.NoError(t, os.Chmod(pub, 0o755))
	run := func(mode string) string {
		root := filepath.Join(pub, mode)
		require.NoError(t, os.Mkdir(root, 0o700))
		require.NoError(t, os.Chown(root, 65534, 65534))
		cmd := exec.Command("/proc/self/exe", "-test.run=^TestHelperUnprivileged$", "-test.count=1")
		cmd.Env = append(os.Environ(), unprivilegedEnv+"="+mode, "CELLOS_TEST_ROOT="+filepath.Join(root, "cells"),
			gvisor.EnvRunscBin+"="+bin, "TMPDIR="+root)
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			require.NoError(t, err)
		}
		return string(out)
	}
	abstract := strings.Contains(runscVersion(t, bin), "20221219")
	refused := run("default")
	if abstract {
		assert.Contains(t, refused, "error: create cell \"unpriv\": host failure: runsc "+bin+" serves each sandbox's control RPC on an abstract Unix socket")
		assert.Contains(t, refused, "WithUnconfinedControlSockets(true)")
		assert.NotContains(t, refused, "exited")
	} else {
		assert.Contains(t, refused, "exited 0", "a runsc with file sockets needs no confinement")
	}
	assert.Contains(t, run("accept"), "exited 0", "the operator accepted the exposure")
}

func runscVersion(t *testing.T, bin string) string {
	out, err := exec.Command(bin, "--version").Output()
	require.NoError(t, err)
	return string(out)
}

// An exec'd process's output is capped like the cell's own streams.
func TestSecurityExecOutputCapped(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t, gvisor.WithOutputCap(1000))
	h := e.create(sh("exec-cap", "sleep 60"))
	st, out, _, err := e.execIn(h.CellID, argv("/bin/sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x"))
	require.NoError(t, err)
	require.Equal(t, 0, st.Code)
	assert.Equal(t, strings.Repeat("x", 1000)+"\n[cellos: stdout truncated]\n", out)
}
