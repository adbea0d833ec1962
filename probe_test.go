package gvisor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/runsc"
)

// testdata/runsc-probe/<generation>/ holds what the two runsc generations printed on this
// project's machine: `runsc --version` (version.txt), `runsc flags` (flags.txt; runsc prints it
// on stderr) and `runsc help platforms` (platforms.txt, for reference).
const (
	genDebian  = "debian-20221219"
	genCurrent = "current-20260905"
)

func probeFile(t *testing.T, gen, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "runsc-probe", gen, name))
	require.NoError(t, err)
	return string(data)
}

func probedFrom(t *testing.T, gen string) *runsc.Probed {
	t.Helper()
	p, err := runsc.Parse("/usr/bin/runsc", probeFile(t, gen, "version.txt"), probeFile(t, gen, "flags.txt"))
	require.NoError(t, err)
	return p
}

func TestProbeInfoPerGeneration(t *testing.T) {
	deb, err := probedFrom(t, genDebian).Info("", true)
	require.NoError(t, err)
	assert.Equal(t, "ptrace", deb.Platform)
	assert.Equal(t, RuntimeFeatures{Overlay2: true, Systrap: false, Rootless: true}, deb.Features)
	assert.True(t, deb.HasFlag("ignore-cgroups"))
	assert.False(t, deb.HasFlag("gofer-network-namespace"))

	cur, err := probedFrom(t, genCurrent).Info("", true)
	require.NoError(t, err)
	assert.Equal(t, "systrap", cur.Platform)
	assert.Equal(t, RuntimeFeatures{Overlay2: true, Overlay2Default: "root:self", Systrap: true, Rootless: true, PinnedNetNS: true}, cur.Features)
	assert.True(t, cur.HasFlag("gofer-network-namespace"))

	b := &Backend{}
	assert.Equal(t, "", b.platformFlag(deb), "runsc's own default is left to it")
	assert.Equal(t, "", b.platformFlag(cur))

	b.opts.platform = "ptrace"
	cur, err = probedFrom(t, genCurrent).Info("ptrace", true)
	require.NoError(t, err)
	assert.Equal(t, "ptrace", cur.Platform)
	assert.Equal(t, "ptrace", b.platformFlag(cur), "WithPlatform is always passed")

	_, err = probedFrom(t, genDebian).Info("systrap", true)
	assert.ErrorContains(t, err, `has no platform "systrap" (it offers ptrace, kvm)`)
	kvm, err := probedFrom(t, genDebian).Info("kvm", true)
	require.NoError(t, err, "kvm when asked for")
	assert.Equal(t, "kvm", kvm.Platform)
}

// fakeProbeBinary writes a script that answers the probe with a generation's captured output,
// optionally edited, counts its invocations in <dir>/count, and runs testdata/fake-runsc for
// everything else.
func fakeProbeBinary(t *testing.T, dir, gen string, edit func(flags string) string) string {
	t.Helper()
	flags := probeFile(t, gen, "flags.txt")
	if edit != nil {
		flags = edit(flags)
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "flags.txt"), []byte(flags), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "version.txt"), []byte(probeFile(t, gen, "version.txt")), 0o644))
	fake, err := filepath.Abs(filepath.Join("testdata", "fake-runsc"))
	require.NoError(t, err)
	bin := filepath.Join(dir, "runsc")
	script := "#!/bin/sh\n" +
		"case \"$*\" in\n" +
		"--version) echo x >>" + dir + "/count; exec cat " + dir + "/version.txt ;;\n" +
		"flags) echo x >>" + dir + "/count; exec cat " + dir + "/flags.txt >&2 ;;\n" +
		"esac\n" +
		"exec " + fake + " \"$@\"\n"
	require.NoError(t, os.WriteFile(bin, []byte(script), 0o755))
	return bin
}

func invocations(t *testing.T, dir string) int {
	data, err := os.ReadFile(filepath.Join(dir, "count"))
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	require.NoError(t, err)
	return strings.Count(string(data), "x")
}

func TestProbeCachedPerBinaryFile(t *testing.T) {
	dir := t.TempDir()
	bin := fakeProbeBinary(t, dir, genCurrent, nil)
	core, logs := observer.New(zap.InfoLevel)
	t.Setenv(EnvRunscBin, bin)
	b, err := New(WithLogger(zap.New(core)))
	require.NoError(t, err)
	ctx := context.Background()

	info, err := b.Runtime(ctx)
	require.NoError(t, err)
	assert.Equal(t, bin, info.Path)
	assert.Equal(t, "VERSION_MISSING", info.Version)
	assert.Equal(t, "systrap", info.Platform)
	assert.Positive(t, info.ProbeTook)
	assert.Equal(t, 2, invocations(t, dir), "two invocations: --version and flags")
	t.Logf("probe of a shell script took %v", info.ProbeTook)

	for range 5 {
		again, err := b.Runtime(ctx)
		require.NoError(t, err)
		assert.Equal(t, info, again)
	}
	other, err := New()
	require.NoError(t, err)
	_, err = other.Runtime(ctx)
	require.NoError(t, err)
	assert.Equal(t, 4, invocations(t, dir), "each Backend owns its cache: another one probes the binary once too")
	assert.Equal(t, 1, logs.FilterMessage("runsc runtime").Len(), "logged once per Backend")

	// The binary is replaced in place: probed again.
	bin = fakeProbeBinary(t, dir, genDebian, nil)
	future := time.Now().Add(time.Hour)
	require.NoError(t, os.Chtimes(bin, future, future))
	info, err = b.Runtime(ctx)
	require.NoError(t, err)
	assert.Equal(t, "0.0~20221219.0", info.Version)
	assert.Equal(t, "ptrace", info.Platform)
	assert.Equal(t, 6, invocations(t, dir))
	assert.Equal(t, 2, logs.FilterMessage("runsc runtime").Len())
}

func TestProbeNotRunsc(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "cells")
	t.Setenv(EnvBundleRoot, root)
	for name, script := range map[string]string{
		"prints-other": "#!/bin/sh\necho 'true (GNU coreutils) 9.1'\n",
		"fails":        "#!/bin/sh\necho 'unknown flag: --version' >&2\nexit 2\n",
		"no-flags":     "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'runsc version 1'; exit 0; }\necho 'flags: unknown subcommand' >&2\nexit 2\n",
		"old": "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'runsc version 2018'; exit 0; }\n" +
			"printf '  -root string\\n    \\troot dir\\n  -platform string\\n    \\tspecifies which platform to use: ptrace (default), kvm.\\n' >&2\n",
	} {
		t.Run(name, func(t *testing.T) {
			bin := filepath.Join(dir, name)
			require.NoError(t, os.WriteFile(bin, []byte(script), 0o755))
			t.Setenv(EnvRunscBin, bin)
			b, err := New()
			require.NoError(t, err)
			_, err = b.Runtime(context.Background())
			require.ErrorIs(t, err, cellos.ErrHost)
			assert.Contains(t, err.Error(), bin)
			_, err = b.Create(context.Background(), &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
				Spec: cellos.CellSpec{ID: "probe-" + name, Run: cellos.RunSpec{Argv: []string{"/bin/true"}}}})
			require.ErrorIs(t, err, cellos.ErrHost)
			assert.Contains(t, err.Error(), `create cell "probe-`+name+`"`)
			switch name {
			case "prints-other":
				assert.Contains(t, err.Error(), "is not a usable runsc")
				assert.Contains(t, err.Error(), "GNU coreutils")
			case "fails":
				assert.Contains(t, err.Error(), "unknown flag: --version")
			case "no-flags":
				assert.Contains(t, err.Error(), "cannot list its flags")
			case "old":
				assert.Contains(t, err.Error(), "lacks global flags the library relies on: --log, --log-format, --network, --ignore-cgroups")
			}
			_, err = os.Stat(root)
			assert.ErrorIs(t, err, os.ErrNotExist, "nothing written before the probe")
		})
	}
}

func TestProbeCtxBoundsTheWaitNotTheProbe(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "slow-runsc")
	real := fakeProbeBinary(t, dir, genDebian, nil)
	require.NoError(t, os.WriteFile(bin, []byte("#!/bin/sh\nsleep 0.5\nexec "+real+" \"$@\"\n"), 0o755))
	t.Setenv(EnvRunscBin, bin)
	b, err := New()
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = b.Runtime(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorIs(t, err, cellos.ErrHost)
	info, err := b.Runtime(context.Background())
	require.NoError(t, err, "the probe went on and serves the next caller")
	assert.Equal(t, "ptrace", info.Platform)
	assert.Equal(t, 2, invocations(t, dir), "one probe for both callers")
}

// A runsc without --overlay2: writable image roots are refused, other cells run without the flag.
func TestProbeNoOverlay2(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("image roots need root")
	}
	dir := t.TempDir()
	bin := fakeProbeBinary(t, dir, genDebian, func(flags string) string {
		i := strings.Index(flags, "  -overlay2 ")
		j := strings.Index(flags, "  -panic-log ")
		require.True(t, i > 0 && j > i)
		return flags[:i] + flags[j:]
	})
	root, log := filepath.Join(dir, "cells"), filepath.Join(dir, "calls.log")
	t.Setenv(EnvRunscBin, bin)
	t.Setenv(EnvBundleRoot, root)
	t.Setenv("FAKE_RUNSC_LOG", log)
	b, err := New()
	require.NoError(t, err)
	info, err := b.Runtime(context.Background())
	require.NoError(t, err)
	require.False(t, info.Features.Overlay2)

	doc := &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
		Spec: cellos.CellSpec{ID: "rw", Run: cellos.RunSpec{Argv: []string{"/bin/true"}},
			Rootfs: &cellos.RootfsSpec{Path: t.TempDir(), Writable: true}}}
	_, err = b.Create(context.Background(), doc)
	require.ErrorIs(t, err, cellos.ErrUnsupported)
	assert.Equal(t, []string{"spec.rootfs.writable"}, cellos.Fields(err))
	assert.Contains(t, err.Error(), "no --overlay2 flag")
	_, err = os.Stat(root)
	assert.ErrorIs(t, err, os.ErrNotExist)

	doc.Spec.ID, doc.Spec.Rootfs = "ro", nil
	h, err := b.Create(context.Background(), doc)
	require.NoError(t, err)
	_, err = b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	rep, err := b.Destroy(context.Background(), h)
	require.NoError(t, err)
	require.True(t, rep.Destroyed)
	data, err := os.ReadFile(log)
	require.NoError(t, err)
	var run string
	for _, line := range strings.Split(string(data), "\n") {
		if strings.Contains(line, "\trun\t") {
			run = line
		}
	}
	require.NotEmpty(t, run, "calls: %s", data)
	assert.NotContains(t, run, "overlay2")
	assert.NotContains(t, run, "--platform", "Debian's default platform is left to it")
	assert.Contains(t, run, "--network=none")
}

// The --platform flag is passed when the choice differs from runsc's own default, and always
// when WithPlatform names one.
func TestPlatformFlag(t *testing.T) {
	b := &Backend{}
	assert.Equal(t, "ptrace", b.platformFlag(RuntimeInfo{Platform: "ptrace", DefaultPlatform: "kvm"}), "runsc's default is kvm: the choice is passed")
	assert.Equal(t, "", b.platformFlag(RuntimeInfo{Platform: "ptrace", DefaultPlatform: "ptrace"}))
	b.opts.platform = "ptrace"
	assert.Equal(t, "ptrace", b.platformFlag(RuntimeInfo{Platform: "ptrace", DefaultPlatform: "ptrace"}))
}
