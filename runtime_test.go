package gvisor_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// The tests below run on whichever runsc the suite runs on (make test: Debian's; make
// test-current: a current build) and assert what that generation does.

func TestRealRuntimeProbe(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	info, err := e.b.Runtime(context.Background())
	require.NoError(t, err)
	t.Logf("runsc %s: version %q, spec %q, platforms %v (runsc default %s), cells on %s, overlay2 %v (default %q), probe %v",
		info.Path, info.Version, info.Spec, info.Platforms, info.DefaultPlatform, info.Platform,
		info.Features.Overlay2, info.Features.Overlay2Default, info.ProbeTook)
	assert.NotEmpty(t, info.Version)
	assert.NotEmpty(t, info.Spec)
	assert.Contains(t, info.Platforms, "ptrace")
	assert.NotEqual(t, "kvm", info.Platform, "never kvm by default")
	assert.True(t, info.Features.Overlay2, "both generations have --overlay2")
	for _, f := range []string{"root", "log", "log-format", "network", "ignore-cgroups", "overlay2", "rootless", "platform"} {
		assert.True(t, info.HasFlag(f), "--%s", f)
	}
	if info.Features.Systrap {
		// Current runsc: systrap, its default and the faster platform.
		assert.Equal(t, "systrap", info.Platform)
		assert.Equal(t, "root:self", info.Features.Overlay2Default, "the library passes --overlay2 explicitly")
	} else {
		// Debian's runsc: ptrace, its default.
		assert.Equal(t, "ptrace", info.Platform)
		assert.Equal(t, "", info.Features.Overlay2Default)
	}
	assert.Less(t, info.ProbeTook, 5*time.Second)

	// Cached: the Backend's later calls get the same probe; another Backend probes for itself.
	again, err := e.b.Runtime(context.Background())
	require.NoError(t, err)
	assert.Equal(t, info.ProbedAt, again.ProbedAt)
	other, err := gvisor.New(gvisor.WithBundleRoot(t.TempDir()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = other.Close(context.Background()) })
	theirs, err := other.Runtime(context.Background())
	require.NoError(t, err)
	assert.Equal(t, info.Version, theirs.Version)

	// A platform the binary lacks is refused before anything is written.
	bad, err := gvisor.New(gvisor.WithBundleRoot(e.root), gvisor.WithPlatform("nosuchplatform"))
	require.NoError(t, err)
	t.Cleanup(func() { _ = bad.Close(context.Background()) })
	_, err = bad.Create(context.Background(), sh("bad-platform", "true"))
	require.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), `has no platform "nosuchplatform"`)
}

// Every platform the library may run on (never kvm) runs a cell on this runsc.
func TestRealRuntimePlatforms(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	info, err := e.b.Runtime(context.Background())
	require.NoError(t, err)
	for _, p := range []string{"ptrace", "systrap"} {
		if !slices.Contains(info.Platforms, p) {
			assert.Equal(t, "systrap", p, "every runsc has ptrace")
			assert.False(t, info.Features.Systrap)
			continue
		}
		b, err := gvisor.New(gvisor.WithBundleRoot(e.root), gvisor.WithPlatform(p), gvisor.WithLogger(zaptest.NewLogger(t)))
		require.NoError(t, err)
		t.Cleanup(func() { _ = b.Close(context.Background()) })
		h, err := b.Create(context.Background(), sh("platform-"+p, "exit 4"))
		require.NoError(t, err)
		st, err := b.WaitForExit(context.Background(), h.CellID)
		require.NoError(t, err, p)
		assert.Equal(t, cellos.ExitStatus{Code: 4, Reason: cellos.ExitExited}, st, p)
		var shim struct {
			Runsc struct{ Platform string } `json:"runsc"`
		}
		data, err := os.ReadFile(filepath.Join(e.root, h.CellID, "shim.json"))
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(data, &shim))
		assert.Equal(t, p, shim.Runsc.Platform, "WithPlatform is passed to runsc")
		rep, err := b.Destroy(context.Background(), h)
		require.NoError(t, err)
		assert.True(t, rep.Destroyed)
	}
}

// mountedUnder lists the mount points below dir.
func mountedUnder(t *testing.T, dir string) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(t, err)
	var out []string
	for line := range strings.Lines(string(data)) {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			out = append(out, f[4])
		}
	}
	return out
}

// Current runsc pins a network namespace in the state root (null-netns, an nsfs bind mount);
// Debian's does not. Either way nothing is left once the last cell is gone.
func TestRealStateRootEmptyAfterLastCell(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	state := filepath.Join(e.root, ".runsc")
	a := e.create(sh("netns-a", "sleep 30"))
	bh := e.create(sh("netns-b", "echo b"))
	_, err := e.b.WaitForExit(context.Background(), bh.CellID)
	require.NoError(t, err)
	info, err := e.b.Runtime(context.Background())
	require.NoError(t, err)
	if info.Features.PinnedNetNS {
		assert.NotEmpty(t, mountedUnder(t, state), "current runsc pins its gofers' network namespace in --root")
	} else {
		assert.Empty(t, mountedUnder(t, state), "Debian's runsc mounts nothing in --root")
	}
	e.destroy(bh)
	if info.Features.PinnedNetNS {
		assert.NotEmpty(t, mountedUnder(t, state), "kept while a cell still uses the state root")
	}
	e.destroy(a)
	assert.Empty(t, mountedUnder(t, state))
	entries, err := os.ReadDir(state)
	require.NoError(t, err)
	assert.Empty(t, entries)
}

// Recover removes a pinned namespace left in an idle state root (a supervisor that crashed after
// its last cell, on current runsc). Simulated with a bind mount of this process's network
// namespace, so it runs on both generations.
func TestRealRecoverRemovesPinnedNetNS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("bind-mounting a namespace needs root")
	}
	t.Parallel()
	e := newRealEnv(t)
	state := filepath.Join(e.root, ".runsc")
	require.NoError(t, os.MkdirAll(state, 0o700))
	pin := filepath.Join(state, "null-netns")
	require.NoError(t, os.WriteFile(pin, nil, 0o444))
	for range 2 { // concurrent cold starts stack mounts
		require.NoError(t, unix.Mount("/proc/self/ns/net", pin, "", unix.MS_BIND, ""))
	}
	t.Cleanup(func() {
		for unix.Unmount(pin, unix.MNT_DETACH) == nil {
		}
	})
	require.Len(t, mountedUnder(t, state), 2)
	rep, err := e.b.Recover(context.Background())
	require.NoError(t, err)
	assert.Empty(t, rep.Adopted)
	assert.Empty(t, rep.Cleaned)
	assert.Empty(t, mountedUnder(t, state))
	assert.NoFileExists(t, pin)
}

// BenchmarkTrivialCellRuntimes measures a trivial cell (/bin/true, no limits) through the
// library: the median time from Create to WaitForExit returning, and of Destroy, for every runsc
// named in $CELLOS_BENCH_RUNSC (space-separated paths; default: the suite's runsc) on every
// platform it offers except kvm. Each round runs one cell per variant, in alternating order, so
// that all variants see the same machine load.
//
//	go test -run '^$' -bench TrivialCellRuntimes -benchtime 21x .
//	CELLOS_BENCH_RUNSC="/usr/bin/runsc $PWD/.cache/runsc-current/runsc" go test -run '^$' -bench TrivialCellRuntimes -benchtime 21x .
func BenchmarkTrivialCellRuntimes(b *testing.B) {
	bins := strings.Fields(os.Getenv("CELLOS_BENCH_RUNSC"))
	if len(bins) == 0 {
		bins = []string{requireRunsc(b)}
	}
	b.Setenv(gvisor.EnvRunscBin, "") // WithRunscPath decides
	root := b.TempDir()
	type variant struct {
		name string
		b    *gvisor.Backend
		runs []time.Duration
		dels []time.Duration
	}
	var variants []*variant
	for gen, bin := range bins {
		probe, err := gvisor.New(gvisor.WithBundleRoot(root), gvisor.WithRunscPath(bin))
		require.NoError(b, err)
		info, err := probe.Runtime(context.Background())
		require.NoError(b, err)
		b.Logf("runsc %d: %s, version %s, platforms %v, probe %v", gen, bin, info.Version, info.Platforms, info.ProbeTook)
		for _, p := range info.Platforms {
			if p == "kvm" {
				continue
			}
			bk, err := gvisor.New(gvisor.WithBundleRoot(root), gvisor.WithRunscPath(bin), gvisor.WithPlatform(p))
			require.NoError(b, err)
			variants = append(variants, &variant{name: fmt.Sprintf("%d-%s", gen, p), b: bk})
		}
	}
	run := func(v *variant, id string) (time.Duration, time.Duration) {
		start := time.Now()
		h, err := v.b.Create(context.Background(), doc(id, "/bin/true"))
		require.NoError(b, err)
		st, err := v.b.WaitForExit(context.Background(), h.CellID)
		require.NoError(b, err)
		require.Equal(b, cellos.ExitExited, st.Reason)
		exited := time.Since(start)
		start = time.Now()
		rep, err := v.b.Destroy(context.Background(), h)
		require.NoError(b, err)
		require.True(b, rep.Destroyed)
		return exited, time.Since(start)
	}
	for _, v := range variants { // warm up: page cache, the probe
		run(v, "warm-"+v.name)
	}
	b.ResetTimer()
	for i := range b.N {
		order := slices.Clone(variants)
		if i%2 == 1 {
			slices.Reverse(order)
		}
		for _, v := range order {
			r, d := run(v, fmt.Sprintf("lat-%s-%d", v.name, i))
			v.runs, v.dels = append(v.runs, r), append(v.dels, d)
		}
	}
	b.StopTimer()
	for _, v := range variants {
		b.ReportMetric(median(v.runs), "ms-run-"+v.name)
		b.ReportMetric(median(v.dels), "ms-destroy-"+v.name)
		b.Logf("runsc %s: create->exit median %.1f ms, destroy median %.1f ms (n=%d)", v.name, median(v.runs), median(v.dels), len(v.runs))
	}
}

func median(ds []time.Duration) float64 {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return float64(m.Microseconds()) / 1000
}
