package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

func TestParse(t *testing.T) {
	type result int
	const (
		ok result = iota
		usage
		help
	)
	tests := []struct {
		name    string
		args    []string
		want    result
		verb    string   // the verb parsed (empty: none)
		rest    []string // its arguments
		globals globals
		keep    bool // run's and restore's --keep
	}{
		{name: "globals before the verb", args: []string{"--debug", "--bundle-root", "/x", "run", "x.json"},
			verb: "run", rest: []string{"x.json"}, globals: globals{debug: true, bundleRoot: "/x"}},
		{name: "globals after the verb", args: []string{"run", "--debug", "--bundle-root=/x", "x.json"},
			verb: "run", rest: []string{"x.json"}, globals: globals{debug: true, bundleRoot: "/x"}},
		{name: "globals on both sides, single dashes", args: []string{"-runsc", "/r", "--allow-root", "list", "-platform", "ptrace"},
			verb: "list", globals: globals{runsc: "/r", allowRoot: true, platform: "ptrace"}},
		{name: "the later value wins", args: []string{"--bundle-root", "/a", "stats", "--bundle-root", "/b", "id"},
			verb: "stats", rest: []string{"id"}, globals: globals{bundleRoot: "/b"}},
		{name: "verb flag", args: []string{"--debug", "run", "--keep", "x.json"},
			verb: "run", rest: []string{"x.json"}, globals: globals{debug: true}, keep: true},
		{name: "verb flag among globals", args: []string{"restore", "--bundle-root", "/x", "--keep", "doc.json", "img"},
			verb: "restore", rest: []string{"doc.json", "img"}, globals: globals{bundleRoot: "/x"}, keep: true},
		{name: "a verb flag before the verb", args: []string{"--keep", "run", "x.json"}, want: usage},
		{name: "a flag after the arguments is an argument", args: []string{"exec", "id", "/bin/ls", "--debug"},
			verb: "exec", rest: []string{"id", "/bin/ls", "--debug"}},
		{name: "exec with --", args: []string{"exec", "--user", "1:2", "id", "--", "/bin/sh", "-c", "true"},
			verb: "exec", rest: []string{"id", "--", "/bin/sh", "-c", "true"}},
		{name: "exec without --", args: []string{"--bundle-root", "/x", "exec", "id", "/bin/true"},
			verb: "exec", rest: []string{"id", "/bin/true"}, globals: globals{bundleRoot: "/x"}},
		{name: "kill", args: []string{"kill", "id", "TERM"}, verb: "kill", rest: []string{"id", "TERM"}},
		{name: "kill's signal defaults", args: []string{"kill", "id"}, verb: "kill", rest: []string{"id"}},
		{name: "alias signal", args: []string{"signal", "--bundle-root=/x", "id", "HUP"},
			verb: "kill", rest: []string{"id", "HUP"}, globals: globals{bundleRoot: "/x"}},
		{name: "delete", args: []string{"delete", "id"}, verb: "delete", rest: []string{"id"}},
		{name: "alias destroy", args: []string{"--debug", "destroy", "id"},
			verb: "delete", rest: []string{"id"}, globals: globals{debug: true}},
		{name: "help", args: []string{"help"}, verb: "help"},
		{name: "help VERB", args: []string{"help", "run"}, verb: "help", rest: []string{"run"}},
		{name: "-h", args: []string{"-h"}, want: help},
		{name: "--help after globals", args: []string{"--debug", "--help"}, want: help},
		{name: "VERB -h", args: []string{"run", "-h"}, want: help, verb: "run"},
		{name: "ALIAS --help", args: []string{"signal", "--help"}, want: help, verb: "kill"},
		{name: "no arguments", args: nil, want: usage},
		{name: "only globals", args: []string{"--debug"}, want: usage},
		{name: "unknown verb", args: []string{"nosuch"}, want: usage},
		{name: "unknown global flag", args: []string{"--nosuch", "run", "x.json"}, want: usage},
		{name: "unknown verb flag", args: []string{"run", "--nosuch", "x.json"}, want: usage, verb: "run"},
		{name: "a flag without its value", args: []string{"list", "--bundle-root"}, want: usage, verb: "list"},
		{name: "run without DOC", args: []string{"run"}, want: usage, verb: "run"},
		{name: "run with two DOCs", args: []string{"run", "a.json", "b.json"}, want: usage, verb: "run"},
		{name: "config without DOC", args: []string{"--debug", "config"}, want: usage, verb: "config"},
		{name: "list with an argument", args: []string{"list", "id"}, want: usage, verb: "list"},
		{name: "exec without ARGV", args: []string{"exec", "id"}, want: usage, verb: "exec"},
		{name: "exec with -- and no ARGV", args: []string{"exec", "id", "--"}, want: usage, verb: "exec"},
		{name: "kill without ID", args: []string{"kill"}, want: usage, verb: "kill"},
		{name: "kill with three", args: []string{"signal", "id", "TERM", "x"}, want: usage, verb: "kill"},
		{name: "stats without ID", args: []string{"stats"}, want: usage, verb: "stats"},
		{name: "pause without ID", args: []string{"pause"}, want: usage, verb: "pause"},
		{name: "resume with two", args: []string{"resume", "a", "b"}, want: usage, verb: "resume"},
		{name: "checkpoint without DIR", args: []string{"checkpoint", "id"}, want: usage, verb: "checkpoint"},
		{name: "restore without DIR", args: []string{"restore", "doc.json"}, want: usage, verb: "restore"},
		{name: "delete without ID", args: []string{"destroy"}, want: usage, verb: "delete"},
		{name: "help with two", args: []string{"help", "run", "exec"}, want: usage, verb: "help"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCLI(&bytes.Buffer{}, &bytes.Buffer{})
			cmd, rest, err := c.parse(tt.args)
			var ue *usageError
			var hr *helpRequest
			switch tt.want {
			case ok:
				require.NoError(t, err)
				assert.Equal(t, tt.rest, nilIfEmpty(rest))
				assert.Equal(t, tt.globals, c.g)
				if f := cmd.flags.Lookup("keep"); f != nil {
					assert.Equal(t, tt.keep, f.Value.String() == "true", "--keep")
				}
			case usage:
				require.ErrorAs(t, err, &ue)
				assert.Equal(t, cmd, ue.cmd)
			case help:
				require.ErrorAs(t, err, &hr)
				assert.Equal(t, cmd, hr.cmd)
			}
			if tt.verb == "" {
				assert.Nil(t, cmd)
			} else if assert.NotNil(t, cmd) {
				assert.Equal(t, tt.verb, cmd.name)
			}
		})
	}
}

func nilIfEmpty(s []string) []string {
	if len(s) == 0 {
		return nil
	}
	return s
}

// TestRunUsageErrors checks the exit codes and where the messages go, through run.
func TestRunUsageErrors(t *testing.T) {
	for _, args := range [][]string{nil, {"nosuch"}, {"--nosuch", "list"}, {"stats"}, {"help", "nosuch"}, {"exec", "id", "--"}} {
		code, out, errOut := runCLI(args...)
		assert.Equal(t, exitUsage, code, "%q", args)
		assert.Empty(t, out, "%q", args)
		assert.Contains(t, errOut, "usage: cellrun [global flags] ", "%q", args)
	}
	code, _, errOut := runCLI("kill")
	assert.Equal(t, exitUsage, code)
	assert.Equal(t, "cellrun kill: missing arguments: want 1 or 2, got 0\n"+
		"usage: cellrun [global flags] kill ID [SIGNAL]\nRun 'cellrun help kill' for details.\n", errOut)

	code, _, errOut = runCLI("--bundle-root", t.TempDir(), "run", filepath.Join(t.TempDir(), "nosuch.json"))
	assert.Equal(t, exitFailure, code, "a document that cannot be read is cellrun's failure, not a usage error")
	assert.Contains(t, errOut, "nosuch.json")
}

// TestTable checks what the help and the parser rely on, for every verb of the table.
func TestTable(t *testing.T) {
	c := newCLI(&bytes.Buffer{}, &bytes.Buffer{})
	names := map[string]bool{}
	c.globalFlags.VisitAll(func(f *flag.Flag) {
		assert.NotEmpty(t, f.Usage, "global flag --%s has no help", f.Name)
	})
	for _, cmd := range c.commands {
		for _, name := range append([]string{cmd.name}, cmd.aliases...) {
			assert.False(t, names[name], "%q names two verbs", name)
			names[name] = true
			assert.Same(t, cmd, c.lookup(name))
		}
		assert.NotEmpty(t, cmd.group, cmd.name)
		assert.NotEmpty(t, cmd.summary, cmd.name)
		assert.NotEmpty(t, strings.TrimSpace(cmd.long), cmd.name)
		assert.NotNil(t, cmd.check, cmd.name)
		assert.NotNil(t, cmd.run, cmd.name)
		cmd.flags.VisitAll(func(f *flag.Flag) {
			assert.NotEmpty(t, f.Usage, "%s --%s has no help", cmd.name, f.Name)
			assert.Nil(t, c.globalFlags.Lookup(f.Name), "%s --%s is a global flag too", cmd.name, f.Name)
		})
		assert.NotPanics(t, func() { c.verbFlags(cmd) }, cmd.name)
		for _, line := range strings.Split(cmd.long, "\n") {
			assert.LessOrEqual(t, len(line), helpWidth, "%s: %q", cmd.name, line)
		}
	}
	for _, verb := range []string{"run", "config", "list", "exec", "kill", "signal", "stats", "pause", "resume",
		"checkpoint", "restore", "delete", "destroy", "pull", "images", "rmi", "image-prune", "help"} {
		assert.True(t, names[verb], "verb %q is missing", verb)
	}
}

func TestHelpOutput(t *testing.T) {
	code, top, errOut := runCLI("help")
	require.Equal(t, 0, code, errOut)
	assert.Empty(t, errOut)
	code, dashH, _ := runCLI("-h")
	require.Equal(t, 0, code)
	assert.Equal(t, top, dashH)
	for _, line := range strings.Split(top, "\n") {
		assert.LessOrEqual(t, len(line), helpWidth, "%q", line)
	}

	c := newCLI(&bytes.Buffer{}, &bytes.Buffer{})
	c.globalFlags.VisitAll(func(f *flag.Flag) { assert.Contains(t, top, "--"+f.Name+" ") })
	for _, cmd := range c.commands {
		assert.Regexp(t, `(?m)^  `+cmd.name+` +`+regexp.QuoteMeta(cmd.summary), top)
		for _, a := range cmd.aliases {
			assert.Contains(t, top, "(alias: "+a+")")
		}

		code, verbHelp, errOut := runCLI("help", cmd.name)
		require.Equal(t, 0, code, errOut)
		assert.True(t, strings.HasPrefix(verbHelp, "usage: "+cmd.usageLine()+"\n"), verbHelp)
		assert.Contains(t, verbHelp, strings.TrimSpace(cmd.long))
		cmd.flags.VisitAll(func(f *flag.Flag) {
			assert.Contains(t, cmd.usageLine(), "[--"+f.Name)
			assert.Contains(t, verbHelp, "\n  --"+f.Name)
		})
		c.globalFlags.VisitAll(func(f *flag.Flag) { assert.Contains(t, verbHelp, "\n  --"+f.Name) })
		for _, name := range append([]string{cmd.name}, cmd.aliases...) {
			code, out, _ := runCLI(name, "-h")
			assert.Equal(t, 0, code)
			assert.Equal(t, verbHelp, out, "%s -h", name)
			code, out, _ = runCLI("--debug", "help", name)
			assert.Equal(t, 0, code)
			assert.Equal(t, verbHelp, out, "help %s", name)
		}
	}
}

func TestUsageLine(t *testing.T) {
	c := newCLI(&bytes.Buffer{}, &bytes.Buffer{})
	assert.Equal(t, "cellrun [global flags] exec [--cwd DIR] [--env KEY=VALUE]... [--user UID[:GID]] ID [--] ARGV...",
		c.lookup("exec").usageLine())
	assert.Equal(t, "cellrun [global flags] run [--keep] DOC.json", c.lookup("run").usageLine())
	assert.Equal(t, "cellrun [global flags] list", c.lookup("list").usageLine())
}

func TestSplitShort(t *testing.T) {
	fs := newFlagSet("x")
	fs.Bool("i", false, "stdin")
	fs.Bool("t", false, "terminal")
	fs.String("u", "", "a value")
	fs.Bool("it", false, "a flag named it")
	fs.Bool("ix", false, "")
	tests := []struct{ in, want []string }{
		{[]string{"-ti", "a"}, []string{"-t", "-i", "a"}},
		{[]string{"-u", "-ti", "-it", "a"}, []string{"-u", "-ti", "-it", "a"}}, // -u's value; a flag named it
		{[]string{"-u=v", "-ti", "a"}, []string{"-u=v", "-t", "-i", "a"}},
		{[]string{"--ti", "a"}, []string{"--ti", "a"}},   // long: one name
		{[]string{"-ti=1", "a"}, []string{"-ti=1", "a"}}, // a value: one name
		{[]string{"-tu", "a"}, []string{"-tu", "a"}},     // u takes a value
		{[]string{"-tz", "a"}, []string{"-tz", "a"}},     // z is no flag: fs.Parse reports it
		{[]string{"a", "-ti"}, []string{"a", "-ti"}},     // after the first argument
		{[]string{"--", "-ti"}, []string{"--", "-ti"}},   // after --
		{[]string{"-", "-ti"}, []string{"-", "-ti"}},     // - is an argument
		{[]string{"-i", "-t", "a"}, []string{"-i", "-t", "a"}},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, splitShort(fs, tt.in), "%q", tt.in)
	}
}

// TestTableTakesCombinedShortFlags adds a verb with -i and -t, as run and exec will have, and
// parses -it after the global flags.
func TestTableTakesCombinedShortFlags(t *testing.T) {
	c := newCLI(&bytes.Buffer{}, &bytes.Buffer{})
	cmd := newCommand("future")
	i := cmd.flags.Bool("i", false, "keep stdin open")
	tty := cmd.flags.Bool("t", false, "a terminal")
	cmd.check = exactly(1)
	c.commands = append(c.commands, cmd)
	got, rest, err := c.parse([]string{"--debug", "future", "-it", "--bundle-root", "/x", "arg"})
	require.NoError(t, err)
	assert.Same(t, cmd, got)
	assert.Equal(t, []string{"arg"}, rest)
	assert.True(t, *i)
	assert.True(t, *tty)
	assert.Equal(t, globals{debug: true, bundleRoot: "/x"}, c.g)
	_, _, err = c.parse([]string{"future", "-iz", "arg"})
	var ue *usageError
	assert.ErrorAs(t, err, &ue)
}

func writeDoc(t *testing.T, doc *cellos.ExecutionCellDocument) string {
	t.Helper()
	raw, err := json.Marshal(doc)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), doc.Spec.ID+".json")
	require.NoError(t, os.WriteFile(path, raw, 0o644))
	return path
}

// TestRunCLI runs cells as `make run` does, with the global flags before the verb and after it.
func TestRunCLI(t *testing.T) {
	requireRunsc(t)
	t.Parallel()
	root := t.TempDir()
	doc := writeDoc(t, shDoc("cli-run", `echo out; echo err >&2; exit 3`))
	code, out, errOut := runCLI("--bundle-root", root, "run", doc)
	assert.Equal(t, 3, code, errOut)
	assert.Equal(t, "out\n", out)
	assert.Regexp(t, `^err\ncellrun: cell "cli-run" ended: exited \(code 3\) in [0-9.]+m?s; teardown: destroyed, 0 cells tracked after\n$`, errOut)

	code, out, errOut = runCLI("run", "--bundle-root="+root, "--keep", doc)
	assert.Equal(t, 3, code, errOut)
	assert.Equal(t, "out\n", out)
	assert.Contains(t, errOut, "bundle kept (cellrun delete cli-run removes it)")
	code, out, _ = runCLI("--bundle-root", root, "list")
	require.Equal(t, 0, code)
	assert.Regexp(t, `(?m)^cli-run\s+exited\s+exited 3\s*$`, out)
	code, _, errOut = runCLI("--bundle-root", root, "delete", "cli-run")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, errOut, `cell "cli-run" destroyed: true`)
	_, err := os.Stat(filepath.Join(root, "cli-run"))
	assert.True(t, errors.Is(err, os.ErrNotExist), "the kept bundle is removed: %v", err)

	code, out, errOut = runCLI("--bundle-root", root, "config", doc)
	require.Equal(t, 0, code, errOut)
	var cfg struct {
		Process struct{ Args []string } `json:"process"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &cfg))
	assert.Equal(t, []string{"/bin/sh", "-c", `echo out; echo err >&2; exit 3`}, cfg.Process.Args)
}
