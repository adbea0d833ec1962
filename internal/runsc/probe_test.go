package runsc

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// ../../testdata/runsc-probe/<generation>/ holds what the two runsc generations printed on the
// project's machine: `runsc --version` (version.txt), `runsc flags` (flags.txt; runsc prints it
// on stderr) and `runsc help platforms` (platforms.txt, for reference).
const (
	genDebian  = "debian-20221219"
	genCurrent = "current-20260905"
)

func probeFile(t *testing.T, gen, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "testdata", "runsc-probe", gen, name))
	require.NoError(t, err)
	return string(data)
}

func probedFrom(t *testing.T, gen string) *Probed {
	t.Helper()
	p, err := Parse("/usr/bin/runsc", probeFile(t, gen, "version.txt"), probeFile(t, gen, "flags.txt"))
	require.NoError(t, err)
	return p
}

func TestProbeParseVersion(t *testing.T) {
	v, spec, err := parseVersion(probeFile(t, genDebian, "version.txt"))
	require.NoError(t, err)
	assert.Equal(t, "0.0~20221219.0", v)
	assert.Equal(t, "1.0.2-dev", spec)

	v, spec, err = parseVersion(probeFile(t, genCurrent, "version.txt"))
	require.NoError(t, err)
	assert.Equal(t, "VERSION_MISSING", v, "a go-install build has no version stamp")
	assert.Equal(t, "1.2.1", spec)

	for _, out := range []string{"", "true (GNU coreutils) 9.1\nCopyright (C) 2022\n", "runc version 1.1.5\nspec: 1.0.2-dev\n"} {
		_, _, err := parseVersion(out)
		assert.ErrorContains(t, err, `no "runsc version" line`, "%q", out)
	}
}

func TestProbeParseFlags(t *testing.T) {
	for _, gen := range []string{genDebian, genCurrent} {
		t.Run(gen, func(t *testing.T) {
			flags := parseFlags(probeFile(t, gen, "flags.txt"))
			for _, f := range append(requiredFlags, "rootless", "overlay2", "debug", "debug-log", "TESTONLY-unsafe-nonroot") {
				assert.Contains(t, flags, f)
			}
			assert.Equal(t, "text", flags["log-format"].Default)
			assert.Equal(t, "", flags["rootless"].Default, "bool flags without a default")
			assert.Equal(t, "-1", flags["debug-log-fd"].Default)
			assert.Contains(t, flags["network"].Usage, "sandbox (default), host, none")
			for name := range flags {
				assert.NotContains(t, name, " ")
				assert.False(t, strings.HasPrefix(name, "-"), name)
			}
		})
	}
	deb, cur := parseFlags(probeFile(t, genDebian, "flags.txt")), parseFlags(probeFile(t, genCurrent, "flags.txt"))
	assert.Equal(t, "", deb["overlay2"].Default)
	assert.Equal(t, "root:self", cur["overlay2"].Default, "a multi-line usage ends with its default")
	assert.Contains(t, cur["overlay2"].Usage, "'none' to turn overlay mode off")
	assert.Contains(t, cur, "gofer-network-namespace")
	assert.NotContains(t, deb, "gofer-network-namespace")

	// Go's one-letter flag layout and odd lines.
	flags := parseFlags("  -x\tshort usage (default 3)\n  -long string\n    \tfirst\n    \tsecond (default \"v\")\ngarbage\n  - \n")
	assert.Equal(t, map[string]flagDoc{
		"x":    {Usage: "short usage (default 3)", Default: "3"},
		"long": {Usage: "first\nsecond (default \"v\")", Default: "v"},
	}, flags)
}

func TestProbeParsePlatforms(t *testing.T) {
	deb, cur := probedFrom(t, genDebian), probedFrom(t, genCurrent)
	assert.Equal(t, []string{"ptrace", "kvm"}, deb.platforms)
	assert.Equal(t, "ptrace", deb.defaultPlatform)
	assert.Equal(t, []string{"systrap", "ptrace", "kvm"}, cur.platforms)
	assert.Equal(t, "systrap", cur.defaultPlatform)

	ps, def := parsePlatforms(flagDoc{Usage: "which platform", Default: "ptrace"})
	assert.Equal(t, []string{"ptrace"}, ps, "the default is a platform even when the list is not documented")
	assert.Equal(t, "ptrace", def)
	ps, def = parsePlatforms(flagDoc{Usage: "specifies which platform to use: kvm (default), Not A Name."})
	assert.Equal(t, []string{"kvm"}, ps)
	assert.Equal(t, "kvm", def)
}

func TestProbeInfoMissingFlags(t *testing.T) {
	p := probedFrom(t, genDebian)
	delete(p.flags, "root")
	delete(p.flags, "ignore-cgroups")
	_, err := p.Info("", true)
	assert.ErrorContains(t, err, "lacks global flags the library relies on: --root, --ignore-cgroups")
	assert.ErrorContains(t, err, "0.0~20221219.0")

	p = probedFrom(t, genDebian)
	delete(p.flags, "rootless")
	_, err = p.Info("", true)
	require.NoError(t, err, "--rootless is needed only without root")
	_, err = p.Info("", false)
	assert.ErrorContains(t, err, "--rootless")

	p = probedFrom(t, genDebian)
	delete(p.flags, "overlay2")
	info, err := p.Info("", true)
	require.NoError(t, err)
	assert.False(t, info.Features.Overlay2)
}

func TestProbeInfoNeverKVMByDefault(t *testing.T) {
	p := probedFrom(t, genDebian)
	p.platforms, p.defaultPlatform = []string{"kvm", "ptrace"}, "kvm"
	info, err := p.Info("", true)
	require.NoError(t, err)
	assert.Equal(t, "ptrace", info.Platform)

	p.platforms = []string{"kvm"}
	_, err = p.Info("", true)
	assert.ErrorContains(t, err, "never picks kvm by default")

	p.platforms, p.defaultPlatform = nil, ""
	info, err = p.Info("", true)
	require.NoError(t, err)
	assert.Equal(t, "ptrace", info.Platform, "undocumented platforms: ptrace, which every runsc has")
}

// BenchmarkProbe measures one uncached probe of the real runsc ($CELLOS_GVISOR_RUNSC_BIN, else
// runsc on $PATH): both invocations, concurrently.
//
//	go test -run '^$' -bench Probe -benchtime 20x .
func BenchmarkProbe(b *testing.B) {
	bin := os.Getenv("CELLOS_GVISOR_RUNSC_BIN")
	if bin == "" {
		bin = "runsc"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		b.Skipf("runsc not found: %v", err)
	}
	for b.Loop() {
		if _, err := runProbe(context.Background(), path); err != nil {
			b.Fatal(err)
		}
	}
}

func TestParsePs(t *testing.T) {
	procs, err := parsePs([]byte("UID       PID       PPID      C         TTY       STIME     TIME      CMD\n" +
		"65534     1         0         4         ?         12:45     20ms      sh\n" +
		"65534     2         1         9         ?         12:45     60ms      sh\n"))
	require.NoError(t, err)
	assert.Equal(t, map[int]int{1: 0, 2: 1}, procs)
	_, err = parsePs([]byte("PID CMD\n1 sh\n"))
	assert.Error(t, err)
}
