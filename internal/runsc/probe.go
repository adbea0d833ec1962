package runsc

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"
)

// Operators run whatever runsc their distribution or their own build gives them, and the
// generations differ (Debian's 2022 package and a current release: platforms, --overlay2
// defaults, networking, OOM behaviour). The library therefore asks the binary what it is before
// the first cell runs on it: `runsc --version` (version, OCI spec version; a binary that does not
// answer like runsc is refused) and `runsc flags` (every global flag with its default, and the
// platforms the -platform flag documents). The two run concurrently, once per binary: the result
// is cached per path and file identity (device, inode, size, modification time), so a binary
// replaced in place, or another one named by CELLOS_GVISOR_RUNSC_BIN, is probed again, and every
// later Create pays a stat(2).
//
// The subcommands and their flags the library uses (run --bundle, kill, delete --force,
// list --format=json) are not probed: every runsc release since 2018 has them, and a binary that
// answers --version as runsc does and knows the global flags below is one of those.

// RuntimeInfo is what the library found out about a runsc binary, and what it chose with it.
type RuntimeInfo struct {
	Path    string // the binary, an absolute path
	Version string // as `runsc --version` prints it: "0.0~20221219.0"; builds without a version stamp say "VERSION_MISSING"
	Spec    string // the OCI runtime-spec version it implements: "1.0.2-dev"

	Platforms       []string // the platforms it offers, as its -platform flag documents them: "ptrace", "kvm", "systrap"
	DefaultPlatform string   // runsc's own default platform
	// Platform is what cells run on: WithPlatform's, else the library's choice (systrap when the
	// binary has it, else runsc's default unless that is kvm, else ptrace). Never kvm by default.
	Platform string

	Flags    []string // every global flag the binary knows, without dashes, sorted
	Features RuntimeFeatures

	ProbedAt  time.Time
	ProbeTook time.Duration // the wall time of the probe (both invocations)
}

// RuntimeFeatures are the capabilities that differ between runsc generations and change what
// the library does.
type RuntimeFeatures struct {
	// Overlay2: the --overlay2 flag. The library passes --overlay2=none (and root:memory for
	// writable image roots) explicitly, because the default differs between generations. Without
	// it, writable image roots are refused (ErrUnsupported).
	Overlay2 bool
	// Overlay2Default is runsc's own --overlay2 default ("" on Debian's, "root:self" on current
	// ones); informational, since the library always sets the flag.
	Overlay2Default string
	// Systrap: the systrap platform (current runsc; faster than ptrace).
	Systrap bool
	// Rootless: the --rootless flag, needed when the library does not run as root.
	Rootless bool
	// PinnedNetNS: the binary pins an empty network namespace for its gofers in the state root
	// (--gofer-network-namespace=null, current runsc's default), the null-netns mount that the
	// library removes once the root holds no container (stateroot.go).
	PinnedNetNS bool
}

// HasFlag reports whether the binary knows the global flag name (without dashes).
func (r RuntimeInfo) HasFlag(name string) bool {
	_, found := slices.BinarySearch(r.Flags, name)
	return found
}

// requiredFlags are the global flags the library passes to every cell's runsc; a binary without
// one of them cannot serve. --rootless is required only when the library does not run as root.
var requiredFlags = []string{"root", "log", "log-format", "network", "ignore-cgroups", "platform"}

// preferredPlatforms is the library's choice, in order, when WithPlatform is not given. systrap
// is faster than ptrace where it exists (see README, "runsc versions"); kvm is never chosen.
var preferredPlatforms = []string{"systrap", "ptrace"}

// probeTimeout bounds one probe; it runs detached from the caller's ctx, so that a Create whose
// ctx ends early does not spoil the result for the next one.
const probeTimeout = 20 * time.Second

// Probed is what a binary says about itself: the part of RuntimeInfo shared by every Backend.
type Probed struct {
	path, version, spec string
	flags               map[string]flagDoc
	platforms           []string
	defaultPlatform     string
	at                  time.Time
	took                time.Duration
}

// flagDoc is one global flag as `runsc flags` documents it.
type flagDoc struct {
	Usage   string
	Default string // "" when not documented
}

// Key identifies a binary file: a replaced or rebuilt runsc has another.
type Key struct {
	path       string
	dev, ino   uint64
	size       int64
	mtimeNanos int64
}

func KeyOf(path string) (Key, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return Key{}, err
	}
	k := Key{path: path, size: fi.Size(), mtimeNanos: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		k.dev, k.ino = uint64(st.Dev), st.Ino
	}
	return k, nil
}

// Prober probes runsc binaries and keeps what they said, per file. Each Backend owns one.
type Prober struct{ once PerBinary[*Probed] }

// Probe returns what the binary at path (absolute) says about itself, probing it unless a probe
// of this very file is kept or under way, and the file's identity. first is true for the caller
// whose call ran the probe.
func (pr *Prober) Probe(ctx context.Context, path string) (p *Probed, key Key, first bool, err error) {
	key, err = KeyOf(path)
	if err != nil {
		return nil, key, false, err
	}
	p, first, err = pr.once.Do(ctx, key, probeTimeout, func(ctx context.Context) (*Probed, error) { return runProbe(ctx, path) })
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("probing runsc %s: %w", path, err)
	}
	return p, key, first, err
}

// Wait returns once no probe is under way.
func (pr *Prober) Wait() { pr.once.Wait() }

// runProbe runs `runsc --version` and `runsc flags`, concurrently, and parses what they print.
func runProbe(ctx context.Context, path string) (*Probed, error) {
	start := time.Now()
	type result struct {
		out []byte
		err error
	}
	version, flags := make(chan result, 1), make(chan result, 1)
	go func() { out, err := probeRun(ctx, path, "--version"); version <- result{out, err} }()
	go func() { out, err := probeRun(ctx, path, "flags"); flags <- result{out, err} }()
	v, f := <-version, <-flags
	took := time.Since(start)
	if v.err != nil {
		return nil, fmt.Errorf("%s is not a usable runsc: `%s --version`: %w", path, path, v.err)
	}
	if f.err != nil {
		if version, _, err := parseVersion(string(v.out)); err == nil {
			return nil, fmt.Errorf("runsc %s (version %s) cannot list its flags: `%s flags`: %w", path, version, path, f.err)
		}
	}
	p, err := Parse(path, string(v.out), string(f.out))
	if err != nil {
		return nil, err
	}
	p.at, p.took = start, took
	return p, nil
}

// Parse reads what the binary at path printed for `--version` and `flags`.
func Parse(path, version, flags string) (*Probed, error) {
	p := &Probed{path: path}
	var err error
	if p.version, p.spec, err = parseVersion(version); err != nil {
		return nil, fmt.Errorf("%s is not a usable runsc: %w", path, err)
	}
	p.flags = parseFlags(flags)
	if len(p.flags) == 0 {
		return nil, fmt.Errorf("runsc %s (version %s): `%s flags` listed no flags: %q", path, p.version, path, Clip(flags, 200))
	}
	if pf, ok := p.flags["platform"]; ok {
		p.platforms, p.defaultPlatform = parsePlatforms(pf)
	}
	return p, nil
}

// probeRun runs the binary with one argument and returns what it printed on stdout and stderr
// (runsc prints `flags` on stderr).
func probeRun(ctx context.Context, path, arg string) ([]byte, error) {
	cmd := (&Runsc{Path: path}).Command(ctx, arg)
	cmd.Dir = "/"
	var out BoundedBuffer
	out.Max = MaxCapture
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", ctx.Err(), err)
		}
		if s := strings.TrimSpace(out.String()); s != "" {
			err = fmt.Errorf("%w: %s", err, Clip(s, 300))
		}
		return nil, err
	}
	return out.Bytes(), nil
}

// parseVersion reads `runsc --version`:
//
//	runsc version 0.0~20221219.0
//	spec: 1.0.2-dev
func parseVersion(out string) (version, spec string, err error) {
	for line := range strings.Lines(out) {
		line = strings.TrimSpace(line)
		if v, ok := strings.CutPrefix(line, "runsc version "); ok && version == "" {
			version = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(line, "spec:"); ok && spec == "" {
			spec = strings.TrimSpace(v)
		}
	}
	if version == "" {
		return "", "", fmt.Errorf("`--version` printed no \"runsc version\" line: %q", Clip(strings.TrimSpace(out), 200))
	}
	return version, spec, nil
}

// parseFlags reads `runsc flags`, Go's flag.PrintDefaults format:
//
//	-name type
//	  	usage, continued
//	  	on more lines (default "value")
//	-boolflag
//	  	usage
func parseFlags(out string) map[string]flagDoc {
	flags := map[string]flagDoc{}
	var name string
	var usage []string
	flush := func() {
		if name != "" {
			u := strings.Join(usage, "\n")
			flags[name] = flagDoc{Usage: u, Default: flagDefault(u)}
		}
		name, usage = "", nil
	}
	for line := range strings.Lines(out) {
		line = strings.TrimRight(line, "\r\n")
		switch {
		case strings.HasPrefix(line, "  -"):
			flush()
			head := strings.TrimPrefix(line, "  -")
			n, rest, _ := strings.Cut(head, "\t") // one-letter flags: "  -x\tusage"
			n, _, _ = strings.Cut(n, " ")
			if !flagName.MatchString(n) {
				continue
			}
			name = n
			if rest = strings.TrimSpace(rest); rest != "" {
				usage = append(usage, rest)
			}
		case strings.HasPrefix(line, "    \t") && name != "":
			usage = append(usage, strings.TrimPrefix(line, "    \t"))
		}
	}
	flush()
	return flags
}

var flagName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// flagDefault extracts the `(default X)` that flag.PrintDefaults appends to a usage text.
func flagDefault(usage string) string {
	if !strings.HasSuffix(usage, ")") {
		return ""
	}
	i := strings.LastIndex(usage, " (default ")
	if i < 0 {
		if strings.HasPrefix(usage, "(default ") {
			i = -1
		} else {
			return ""
		}
	}
	v := strings.TrimSuffix(usage[i+len(" (default "):], ")")
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		v = v[1 : len(v)-1]
	}
	return v
}

var platformName = regexp.MustCompile(`^[a-z][a-z0-9_-]*$`)

// parsePlatforms reads the -platform flag's usage: "specifies which platform to use: systrap
// (default), ptrace, kvm." with `(default "systrap")` after it.
func parsePlatforms(f flagDoc) (platforms []string, def string) {
	def = f.Default
	_, list, ok := strings.Cut(f.Usage, "use:")
	if ok {
		list, _, _ = strings.Cut(list, ".")
		for item := range strings.SplitSeq(list, ",") {
			item = strings.TrimSpace(item)
			isDefault := strings.HasSuffix(item, "(default)")
			item = strings.TrimSpace(strings.TrimSuffix(item, "(default)"))
			if !platformName.MatchString(item) {
				continue
			}
			platforms = append(platforms, item)
			if isDefault && def == "" {
				def = item
			}
		}
	}
	if def != "" && !slices.Contains(platforms, def) {
		platforms = append(platforms, def)
	}
	return platforms, def
}

// Clip shortens s to n bytes for a message.
func Clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// Info turns a probe into the RuntimeInfo of a Backend with the given platform option, or an
// error naming what the binary lacks.
func (p *Probed) Info(platformOpt string, root bool) (RuntimeInfo, error) {
	info := RuntimeInfo{
		Path: p.path, Version: p.version, Spec: p.spec,
		Platforms: slices.Clone(p.platforms), DefaultPlatform: p.defaultPlatform,
		ProbedAt: p.at, ProbeTook: p.took,
	}
	for name := range p.flags {
		info.Flags = append(info.Flags, name)
	}
	slices.Sort(info.Flags)
	ov, hasOverlay := p.flags["overlay2"]
	info.Features = RuntimeFeatures{
		Overlay2:        hasOverlay,
		Overlay2Default: ov.Default,
		Systrap:         slices.Contains(p.platforms, "systrap"),
		Rootless:        info.HasFlag("rootless"),
		PinnedNetNS:     p.flags["gofer-network-namespace"].Default == "null",
	}
	var missing []string
	for _, f := range requiredFlags {
		if !info.HasFlag(f) {
			missing = append(missing, "--"+f)
		}
	}
	if !root && !info.Features.Rootless {
		missing = append(missing, "--rootless (the library does not run as root)")
	}
	if len(missing) > 0 {
		return info, fmt.Errorf("runsc %s (version %s) lacks global flags the library relies on: %s", p.path, p.version, strings.Join(missing, ", "))
	}
	switch {
	case platformOpt != "":
		if len(p.platforms) > 0 && !slices.Contains(p.platforms, platformOpt) {
			return info, fmt.Errorf("runsc %s (version %s) has no platform %q (it offers %s)", p.path, p.version, platformOpt, strings.Join(p.platforms, ", "))
		}
		info.Platform = platformOpt
	default:
		for _, name := range preferredPlatforms {
			if slices.Contains(p.platforms, name) {
				info.Platform = name
				break
			}
		}
		if info.Platform == "" {
			if p.defaultPlatform != "" && p.defaultPlatform != "kvm" {
				info.Platform = p.defaultPlatform
			} else if len(p.platforms) == 0 {
				info.Platform = "ptrace" // the platform of every runsc; its docs did not say
			} else {
				return info, fmt.Errorf("runsc %s (version %s) offers no platform but %s, and the library never picks kvm by default; choose one with WithPlatform",
					p.path, p.version, strings.Join(p.platforms, ", "))
			}
		}
	}
	return info, nil
}
