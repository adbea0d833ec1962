package main

// The command line: the global flags, the parsing of `cellrun [global flags] VERB [verb flags]
// ARGS` against the command table, and the exit codes.

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"go.uber.org/zap"

	gvisor "github.com/cellos/cellos-host-gvisor"
)

const (
	// exitFailure is cellrun's exit code when it, the document or runsc failed.
	exitFailure = 125
	// exitUsage is its exit code for a command line it cannot read.
	exitUsage = 2
)

// globals are the flags every verb takes, before the verb or after it.
type globals struct {
	bundleRoot string
	runsc      string
	platform   string
	debug      bool
	allowRoot  bool
	imageStore string
	insecure   listFlag
}

func (g *globals) register(fs *flag.FlagSet) {
	fs.StringVar(&g.bundleRoot, "bundle-root", "",
		"the `DIR` that holds the cells' bundles (default "+gvisor.DefaultBundleRoot()+"); $"+gvisor.EnvBundleRoot+" overrides it")
	fs.StringVar(&g.runsc, "runsc", "",
		"the runsc binary, a `PATH` or a name on $PATH (default runsc); $"+gvisor.EnvRunscBin+" overrides it")
	fs.StringVar(&g.platform, "platform", "",
		"runsc's platform `NAME`: ptrace, systrap or kvm (default systrap where runsc has it, else ptrace)")
	fs.BoolVar(&g.debug, "debug", false, "log what the library does to stderr")
	fs.StringVar(&g.imageStore, "image-store", "",
		"the image store's `DIR` (default "+gvisor.DefaultImageStore()+"); $"+gvisor.EnvImageStore+" overrides it")
	fs.Var(&g.insecure, "insecure-registry", "a registry `HOST[:PORT]` that may be reached over plain HTTP (repeatable)")
	fs.BoolVar(&g.allowRoot, "allow-root", false,
		"let the cell's process, or an exec'd one, run as uid or gid 0 inside the cell")
}

// options are the Backend options the global flags choose.
func (g *globals) options() []gvisor.Option {
	// One cell per invocation: a spare shim would only be started to be thrown away.
	opts := []gvisor.Option{gvisor.WithSpareShim(false), gvisor.WithAllowRoot(g.allowRoot)}
	if g.bundleRoot != "" {
		opts = append(opts, gvisor.WithBundleRoot(g.bundleRoot))
	}
	if g.runsc != "" {
		opts = append(opts, gvisor.WithRunscPath(g.runsc))
	}
	if g.imageStore != "" {
		opts = append(opts, gvisor.WithImageStore(g.imageStore))
	}
	if len(g.insecure.vals) > 0 {
		opts = append(opts, gvisor.WithInsecureRegistries(g.insecure.vals...))
	}
	if g.platform != "" {
		opts = append(opts, gvisor.WithPlatform(g.platform))
	}
	if g.debug {
		cfg := zap.NewDevelopmentConfig()
		cfg.OutputPaths = []string{"stderr"}
		if l, err := cfg.Build(); err == nil {
			opts = append(opts, gvisor.WithLogger(l))
		}
	}
	return opts
}

// cli is one invocation of cellrun: its streams, its flags' values and its command table.
type cli struct {
	stdout, stderr io.Writer
	g              globals
	globalFlags    *flag.FlagSet
	commands       []*command
}

func newCLI(stdout, stderr io.Writer) *cli {
	c := &cli{stdout: stdout, stderr: stderr, globalFlags: newFlagSet("cellrun")}
	c.g.register(c.globalFlags)
	c.commands = c.table()
	return c
}

// newFlagSet is a flag set that reports its errors to its caller and prints nothing itself.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// lookup finds a verb by its name or an alias.
func (c *cli) lookup(name string) *command {
	for _, cmd := range c.commands {
		if cmd.name == name {
			return cmd
		}
		for _, a := range cmd.aliases {
			if a == name {
				return cmd
			}
		}
	}
	return nil
}

// usageError is a command line cellrun cannot read; cmd is the verb, when it got that far.
type usageError struct {
	cmd *command
	msg string
}

func (e *usageError) Error() string { return e.msg }

// helpRequest is -h or --help: cmd's help, or cellrun's when cmd is nil.
type helpRequest struct{ cmd *command }

func (h *helpRequest) Error() string { return "help requested" }

// parse reads `[global flags] VERB [verb flags] ARGS`, setting the flags' values, and returns the
// verb and its arguments. Its errors are a *usageError or a *helpRequest.
func (c *cli) parse(args []string) (*command, []string, error) {
	if err := c.globalFlags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, nil, &helpRequest{}
		}
		return nil, nil, &usageError{msg: err.Error()}
	}
	rest := c.globalFlags.Args()
	if len(rest) == 0 {
		return nil, nil, &usageError{msg: "no verb"}
	}
	cmd := c.lookup(rest[0])
	if cmd == nil {
		return nil, nil, &usageError{msg: fmt.Sprintf("unknown verb %q", rest[0])}
	}
	fs := c.verbFlags(cmd)
	if err := fs.Parse(splitShort(fs, rest[1:])); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return cmd, nil, &helpRequest{cmd: cmd}
		}
		return cmd, nil, &usageError{cmd: cmd, msg: err.Error()}
	}
	if err := cmd.check(fs.Args()); err != nil {
		return cmd, nil, &usageError{cmd: cmd, msg: err.Error()}
	}
	return cmd, fs.Args(), nil
}

// verbFlags is the flag set that reads what follows cmd: its own flags and the global ones.
func (c *cli) verbFlags(cmd *command) *flag.FlagSet {
	fs := newFlagSet("cellrun " + cmd.name)
	for _, from := range []*flag.FlagSet{cmd.flags, c.globalFlags} {
		from.VisitAll(func(f *flag.Flag) { fs.Var(f.Value, f.Name, f.Usage) })
	}
	return fs
}

// run parses args and runs the verb; it returns cellrun's exit code.
func (c *cli) run(args []string) int {
	cmd, rest, err := c.parse(args)
	var help *helpRequest
	var usage *usageError
	switch {
	case errors.As(err, &help):
		if help.cmd == nil {
			c.writeUsage(c.stdout)
		} else {
			c.writeHelp(c.stdout, help.cmd)
		}
		return 0
	case errors.As(err, &usage):
		c.usageFailure(usage)
		return exitUsage
	}
	return cmd.run(rest)
}

// usageFailure reports a command line cellrun cannot read: what is wrong, the usage line, and
// where the help is.
func (c *cli) usageFailure(e *usageError) {
	if e.cmd == nil {
		fmt.Fprintf(c.stderr, "cellrun: %s\nusage: %s\nRun 'cellrun help' for the verbs and flags.\n", e.msg, topUsageLine)
		return
	}
	fmt.Fprintf(c.stderr, "cellrun %s: %s\nusage: %s\nRun 'cellrun help %s' for details.\n",
		e.cmd.name, e.msg, e.cmd.usageLine(), e.cmd.name)
}

// fail reports cellrun's own failure (or the document's, or runsc's) and returns its exit code.
func (c *cli) fail(err error) int {
	fmt.Fprintf(c.stderr, "cellrun: %v\n", err)
	return exitFailure
}

// splitShort turns combined one-letter boolean flags into separate ones (-it into -i -t), as
// docker and getopt read them; the flag package alone would look for a flag named "it". It looks
// at the arguments fs.Parse reads as flags: those before the first non-flag argument or "--".
func splitShort(fs *flag.FlagSet, args []string) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" || len(a) < 2 || a[0] != '-' {
			return append(out, args[i:]...)
		}
		name, _, hasValue := strings.Cut(strings.TrimPrefix(a[1:], "-"), "=")
		if f := fs.Lookup(name); f != nil {
			out = append(out, a)
			if !isBoolFlag(f) && !hasValue && i+1 < len(args) {
				i++ // the flag's value, whatever it looks like
				out = append(out, args[i])
			}
			continue
		}
		if split, ok := shortBools(fs, a); ok {
			out = append(out, split...)
			continue
		}
		out = append(out, a) // fs.Parse reports it
	}
	return out
}

// shortBools splits -xyz into -x -y -z when each letter is a one-letter boolean flag of fs.
func shortBools(fs *flag.FlagSet, a string) ([]string, bool) {
	if len(a) < 3 || a[1] == '-' || strings.Contains(a, "=") {
		return nil, false
	}
	var split []string
	for _, r := range a[1:] {
		f := fs.Lookup(string(r))
		if f == nil || !isBoolFlag(f) {
			return nil, false
		}
		split = append(split, "-"+string(r))
	}
	return split, true
}

func isBoolFlag(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}
