package main

// The command table: one command per verb, from which the parser reads the command line and
// `cellrun help` writes every usage line and flag list.

import (
	"flag"
	"fmt"
	"io"
	"strings"
)

// A command is one verb of cellrun: what its help says and what runs it.
type command struct {
	name    string
	aliases []string // other names of the verb, kept so that command lines using them still work
	group   string   // the heading `cellrun help` lists it under
	summary string   // one line for the list of verbs
	args    string   // the arguments after the flags, as the usage line shows them
	long    string   // what `cellrun help VERB` says after the usage line
	flags   *flag.FlagSet
	check   func(args []string) error // the arguments' count (and shape); a failure is a usage error
	run     func(args []string) int   // the exit code
}

// newCommand starts a command with an empty flag set of its own.
func newCommand(name string) *command {
	return &command{name: name, flags: newFlagSet("cellrun " + name)}
}

// The groups `cellrun help` lists the verbs under, in this order.
const (
	groupCell    = "running a cell"
	groupOperate = "operating on the cells of a bundle root (a supervisor's, or cellrun run --keep's)"
	groupHelp    = "about cellrun"
)

// table is cellrun's verbs in the order `cellrun help` lists them.
//
// The design fixes verbs that are not here yet: `cp SRC DST` (ID:PATH on either side) and `logs [-f] ID`;
// run and exec will take -i (stdin) and -t (terminal), which the parser already reads combined as
// -it (splitShort). Each is one more constructor here.
func (c *cli) table() []*command {
	return []*command{
		c.runCommand(),
		c.configCommand(),
		c.listCommand(),
		c.execCommand(),
		c.killCommand(),
		c.statsCommand(),
		c.pauseCommand(),
		c.resumeCommand(),
		c.checkpointCommand(),
		c.restoreCommand(),
		c.deleteCommand(),
		c.pullCommand(),
		c.imagesCommand(),
		c.rmiCommand(),
		c.imagePruneCommand(),
		c.helpCommand(),
	}
}

// exactly is an argument check for n arguments.
func exactly(n int) func([]string) error { return between(n, n) }

// between is an argument check for lo to hi arguments.
func between(lo, hi int) func([]string) error {
	want := fmt.Sprint(lo)
	switch {
	case hi == lo+1:
		want = fmt.Sprintf("%d or %d", lo, hi)
	case hi > lo:
		want = fmt.Sprintf("%d to %d", lo, hi)
	}
	return func(args []string) error {
		switch {
		case len(args) < lo:
			return fmt.Errorf("missing arguments: want %s, got %d", want, len(args))
		case len(args) > hi:
			return fmt.Errorf("too many arguments: want %s, got %d", want, len(args))
		}
		return nil
	}
}

const topUsageLine = "cellrun [global flags] VERB [verb flags] ARGS"

// usageLine is the verb's synopsis: its flags, from its flag set, and its arguments.
func (cmd *command) usageLine() string {
	var b strings.Builder
	b.WriteString("cellrun [global flags] " + cmd.name)
	cmd.flags.VisitAll(func(f *flag.Flag) {
		b.WriteString(" [" + flagSynopsis(f) + "]")
		if r, ok := f.Value.(interface{ repeatable() bool }); ok && r.repeatable() {
			b.WriteString("...")
		}
	})
	if cmd.args != "" {
		b.WriteString(" " + cmd.args)
	}
	return b.String()
}

// flagSynopsis is --name, followed by the name of its value unless it is a boolean flag.
func flagSynopsis(f *flag.Flag) string {
	name, _ := flag.UnquoteUsage(f)
	if name == "" {
		return "--" + f.Name
	}
	return "--" + f.Name + " " + name
}

// helpWidth is the width help text is wrapped to.
const helpWidth = 100

// writeFlags lists a flag set, one flag a paragraph: its synopsis, then its help wrapped beside it.
func writeFlags(w io.Writer, fs *flag.FlagSet) {
	width := 0
	fs.VisitAll(func(f *flag.Flag) { width = max(width, len(flagSynopsis(f))) })
	indent := 2 + width + 2
	fs.VisitAll(func(f *flag.Flag) {
		_, help := flag.UnquoteUsage(f)
		if f.DefValue != "" && f.DefValue != "false" {
			help += fmt.Sprintf(" (default %s)", f.DefValue)
		}
		lines := wrap(help, max(helpWidth-indent, 30))
		fmt.Fprintf(w, "  %-*s  %s\n", width, flagSynopsis(f), lines[0])
		for _, l := range lines[1:] {
			fmt.Fprintf(w, "%*s%s\n", indent, "", l)
		}
	})
}

// wrap breaks text into lines of at most width bytes, at spaces (a longer word has its own line).
func wrap(text string, width int) []string {
	var lines []string
	line := ""
	for _, word := range strings.Fields(text) {
		switch {
		case line == "":
			line = word
		case len(line)+1+len(word) <= width:
			line += " " + word
		default:
			lines = append(lines, line)
			line = word
		}
	}
	return append(lines, line)
}

// writeUsage is `cellrun help`: the verbs by group, the global flags, the exit codes.
func (c *cli) writeUsage(w io.Writer) {
	fmt.Fprintf(w, "cellrun runs CellOS execution cells under gVisor (runsc).\n\nusage: %s\n", topUsageLine)
	width := 0
	for _, cmd := range c.commands {
		width = max(width, len(cmd.name))
	}
	group := ""
	for _, cmd := range c.commands {
		if cmd.group != group {
			group = cmd.group
			fmt.Fprintf(w, "\n%s:\n", group)
		}
		summary := cmd.summary
		if len(cmd.aliases) > 0 {
			summary += " (alias: " + strings.Join(cmd.aliases, ", ") + ")"
		}
		fmt.Fprintf(w, "  %-*s  %s\n", width, cmd.name, summary)
	}
	fmt.Fprint(w, "\nglobal flags, before the verb or after it:\n")
	writeFlags(w, c.globalFlags)
	fmt.Fprint(w, `
exit codes: the cell's own for run and restore, the process's for exec; 125 when cellrun, the
document or runsc failed; 2 for usage errors.

Run 'cellrun help VERB' (or 'cellrun VERB -h') for a verb's arguments and flags.
`)
}

// writeHelp is `cellrun help VERB`.
func (c *cli) writeHelp(w io.Writer, cmd *command) {
	fmt.Fprintf(w, "usage: %s\n", cmd.usageLine())
	if len(cmd.aliases) > 0 {
		fmt.Fprintf(w, "alias: %s\n", strings.Join(cmd.aliases, ", "))
	}
	fmt.Fprintf(w, "\n%s\n", strings.TrimSpace(cmd.long))
	hasFlags := false
	cmd.flags.VisitAll(func(*flag.Flag) { hasFlags = true })
	if hasFlags {
		fmt.Fprint(w, "\nflags:\n")
		writeFlags(w, cmd.flags)
	}
	fmt.Fprint(w, "\nglobal flags, before the verb or after it:\n")
	writeFlags(w, c.globalFlags)
}

func (c *cli) helpCommand() *command {
	cmd := newCommand("help")
	cmd.group = groupHelp
	cmd.summary = "list the verbs, or describe one"
	cmd.args = "[VERB]"
	cmd.long = `
Help without a verb lists cellrun's verbs and global flags. With one, it shows the verb's usage,
what it does, and its flags. 'cellrun VERB -h' shows the same.`
	cmd.check = between(0, 1)
	cmd.run = func(args []string) int {
		if len(args) == 0 {
			c.writeUsage(c.stdout)
			return 0
		}
		verb := c.lookup(args[0])
		if verb == nil {
			c.usageFailure(&usageError{msg: fmt.Sprintf("unknown verb %q", args[0])})
			return exitUsage
		}
		c.writeHelp(c.stdout, verb)
		return 0
	}
	return cmd
}
