package main

// The operator's verbs work on the cells of a bundle root, whichever process created them (a
// running supervisor, a `cellrun run --keep`): each attaches to the cell (Backend.Attach), does
// its one thing and leaves the cell to its owner. Where runc has a verb that does the same, the
// verb has runc's name.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"

	"golang.org/x/sys/unix"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// attached is a Backend that tracks cell id, which another process created.
func (c *cli) attached(ctx context.Context, id string) (*gvisor.Backend, error) {
	b, err := gvisor.New(c.g.options()...)
	if err != nil {
		return nil, err
	}
	if _, err := b.Attach(ctx, id); err != nil {
		return nil, err
	}
	return b, nil
}

// onCell is a verb that attaches to the cell its first argument names and calls do.
func (c *cli) onCell(do func(ctx context.Context, b *gvisor.Backend, id string, args []string) error) func([]string) int {
	return func(args []string) int {
		ctx := context.Background()
		b, err := c.attached(ctx, args[0])
		if err != nil {
			return c.fail(err)
		}
		if err := do(ctx, b, args[0], args[1:]); err != nil {
			return c.fail(err)
		}
		return 0
	}
}

// cellVerb is a verb that attaches to one cell of the bundle root (ID, its first argument) and
// does one thing to it.
func (c *cli) cellVerb(name, summary, args, long string, check func([]string) error,
	do func(ctx context.Context, b *gvisor.Backend, id string, args []string) error) *command {
	cmd := newCommand(name)
	cmd.group = groupOperate
	cmd.summary, cmd.args, cmd.long, cmd.check = summary, args, long, check
	cmd.run = c.onCell(do)
	return cmd
}

func (c *cli) listCommand() *command {
	cmd := newCommand("list")
	cmd.group = groupOperate
	cmd.summary = "the cells of the bundle root and their status"
	cmd.long = `
List shows every cell of the bundle root, whichever process created it, with its status: running,
paused, exited (with its exit status), failed, checkpointed, or lost (no shim and no record: being
created, or its shim died). It reads the bundles only.`
	cmd.check = exactly(0)
	cmd.run = func([]string) int {
		b, err := gvisor.New(c.g.options()...)
		if err != nil {
			return c.fail(err)
		}
		cells, err := b.List(context.Background())
		if err != nil {
			return c.fail(err)
		}
		tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tSTATUS\tEXIT")
		for _, cell := range cells {
			exit := ""
			if cell.Exit != nil {
				exit = fmt.Sprintf("%s %d", cell.Exit.Reason, cell.Exit.Code)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", cell.ID, cell.Status, exit)
		}
		_ = tw.Flush()
		return 0
	}
	return cmd
}

func (c *cli) execCommand() *command {
	cmd := newCommand("exec")
	cmd.group = groupOperate
	cmd.summary = "run a process inside a running cell; exit with its exit code"
	cmd.args = "ID [--] ARGV..."
	cmd.long = `
Exec runs ARGV inside cell ID with the cell's isolation (its sandbox and mounts, no capabilities,
no new privileges), copies its stdout and stderr to cellrun's own and exits with its exit code.
SIGINT (Ctrl-C), SIGTERM and SIGHUP kill the exec'd process and its descendants, not the cell
(exit 130). The -- before ARGV may be left out.`
	user := cmd.flags.String("user", "", "run as `UID[:GID]` (default the cell's user; the gid defaults to the uid)")
	cwd := cmd.flags.String("cwd", "", "run in `DIR` (default the cell's working directory)")
	var env envFlag
	cmd.flags.Var(&env, "env", "add `KEY=VALUE` to the cell's environment; may be repeated")
	cmd.check = func(args []string) error {
		if len(args) > 1 && args[1] == "--" {
			args = args[1:]
		}
		if len(args) < 2 {
			return fmt.Errorf("missing arguments: want ID and ARGV, got %d", len(args))
		}
		return nil
	}
	cmd.run = func(args []string) int {
		id, argv := args[0], args[1:]
		if argv[0] == "--" {
			argv = argv[1:]
		}
		spec := cellos.RunSpec{Argv: argv, Env: env.vars, WorkingDir: *cwd}
		if *user != "" {
			u, err := parseUser(*user)
			if err != nil {
				return c.fail(err)
			}
			spec.User = &u
		}
		ctx := context.Background()
		b, err := c.attached(ctx, id)
		if err != nil {
			return c.fail(err)
		}
		ictx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
		defer stop()
		st, err := b.Exec(ictx, id, spec, c.stdout, c.stderr)
		if err != nil {
			if ictx.Err() != nil && ctx.Err() == nil {
				fmt.Fprintf(c.stderr, "cellrun: interrupted: the process was killed\n")
				return 128 + int(syscall.SIGINT)
			}
			return c.fail(err)
		}
		return st.Code
	}
	return cmd
}

func (c *cli) killCommand() *command {
	cmd := c.cellVerb("kill", "send a signal to a cell's main process", "ID [SIGNAL]", `
Kill sends SIGNAL (default TERM) to cell ID's main process, as runc kill does: the workload
decides what its children get; exec'd processes are not signalled. SIGNAL is a name (TERM), a SIG
name (SIGTERM) or a number (15). gVisor does not shield a cell's init from signals it does not
handle, so TERM ends a workload that does not trap it. Delete stops a cell for good and removes it.`,
		between(1, 2), func(ctx context.Context, b *gvisor.Backend, id string, args []string) error {
			sig := syscall.SIGTERM
			if len(args) > 0 {
				var err error
				if sig, err = parseSignal(args[0]); err != nil {
					return err
				}
			}
			return b.Signal(ctx, id, sig)
		})
	cmd.aliases = []string{"signal"}
	return cmd
}

func (c *cli) statsCommand() *command {
	cmd := c.cellVerb("stats", "a cell's memory, CPU and task figures, as JSON", "ID", `
Stats prints cell ID's figures as JSON: memoryBytes (in use inside the sandbox), pids (its
tasks), and cpuNanos and hostMemoryBytes (what the cell costs the host, the sandbox's own
overhead included).`,
		exactly(1), func(ctx context.Context, b *gvisor.Backend, id string, _ []string) error {
			st, err := b.Stats(ctx, id)
			if err != nil {
				return err
			}
			data, err := json.MarshalIndent(st, "", "  ")
			if err != nil {
				return err
			}
			fmt.Fprintf(c.stdout, "%s\n", data)
			return nil
		})
	return cmd
}

func (c *cli) pauseCommand() *command {
	cmd := c.cellVerb("pause", "freeze every process of a cell", "ID", `
Pause freezes every process of cell ID. A paused cell answers stats and can be deleted; exec into
it and checkpoint of it are refused. Resume thaws it.`,
		exactly(1), func(ctx context.Context, b *gvisor.Backend, id string, _ []string) error {
			return b.Pause(ctx, id)
		})
	return cmd
}

func (c *cli) resumeCommand() *command {
	cmd := c.cellVerb("resume", "thaw a paused cell", "ID", `
Resume thaws cell ID, which pause froze.`,
		exactly(1), func(ctx context.Context, b *gvisor.Backend, id string, _ []string) error {
			return b.Resume(ctx, id)
		})
	return cmd
}

func (c *cli) checkpointCommand() *command {
	cmd := c.cellVerb("checkpoint", "save a cell into a directory and stop it", "ID DIR", `
Checkpoint saves cell ID (its processes, memory and tmpfs contents) into DIR and stops it; it
returns once the cell has stopped. 'cellrun restore DOC.json DIR' runs it on. The checkpointed
cell has no exit status of its own and still needs delete. A paused cell is refused.`,
		exactly(2), func(ctx context.Context, b *gvisor.Backend, id string, args []string) error {
			if err := b.Checkpoint(ctx, id, args[0]); err != nil {
				return err
			}
			fmt.Fprintf(c.stderr, "cellrun: cell %q checkpointed to %s and stopped; `cellrun restore DOC.json %s` runs it on\n", id, args[0], args[0])
			return nil
		})
	return cmd
}

func (c *cli) restoreCommand() *command {
	cmd := newCommand("restore")
	cmd.group = groupOperate
	cmd.summary = "run a cell from a checkpoint in a directory, as run does"
	cmd.args = "DOC.json DIR"
	cmd.long = `
Restore runs the cell DOC.json describes from the checkpoint image in DIR, and then does what run
does: streams its output, destroys it when it ends (unless --keep) and exits with its exit code.
DOC.json describes the cell as it was checkpointed (the same mounts, root and resources); its id
and lifetime are new, the lifetime counting from the restore.`
	cmd.check = exactly(2)
	cmd.run = c.foreground(cmd, func(b *gvisor.Backend, args []string) launcher {
		return func(ctx context.Context, doc *cellos.ExecutionCellDocument) (cellos.CellHandle, error) {
			return b.Restore(ctx, doc, args[1])
		}
	})
	return cmd
}

func (c *cli) deleteCommand() *command {
	cmd := newCommand("delete")
	cmd.aliases = []string{"destroy"}
	cmd.group = groupOperate
	cmd.summary = "kill a cell and remove everything of it"
	cmd.args = "ID"
	cmd.long = `
Delete kills cell ID and removes everything of it (processes, cgroups, network, mounts, bundle),
as runc delete --force does, and says whether nothing is left. It also removes what is left of a
cell no shim runs: one run --keep kept, one whose shim died. Deleting a supervisor's cell kills
it; the supervisor sees it end.`
	cmd.check = exactly(1)
	cmd.run = func(args []string) int {
		ctx := context.Background()
		id := args[0]
		b, err := gvisor.New(c.g.options()...)
		if err != nil {
			return c.fail(err)
		}
		// A cell no shim runs cannot be attached; Destroy removes what is left of it all the same.
		if _, err := b.Attach(ctx, id); err != nil && !errors.Is(err, cellos.ErrNotTracked) {
			return c.fail(err)
		}
		rep, err := b.Destroy(ctx, cellos.CellHandle{CellID: id})
		if err != nil {
			return c.fail(err)
		}
		fmt.Fprintf(c.stderr, "cellrun: cell %q destroyed: %v\n", id, rep.Destroyed)
		return 0
	}
	return cmd
}

// envFlag collects --env KEY=VALUE flags.
type envFlag struct{ vars map[string]string }

func (e *envFlag) String() string { return "" }

// repeatable marks the flag as one that may be given more than once, for the usage line.
func (e *envFlag) repeatable() bool { return true }

func (e *envFlag) Set(kv string) error {
	k, v, ok := strings.Cut(kv, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q is not KEY=VALUE", kv)
	}
	if e.vars == nil {
		e.vars = map[string]string{}
	}
	e.vars[k] = v
	return nil
}

// parseUser reads UID or UID:GID (the gid defaults to the uid).
func parseUser(s string) (cellos.UserSpec, error) {
	us, gs, hasGID := strings.Cut(s, ":")
	uid, err := strconv.ParseUint(us, 10, 32)
	if err != nil {
		return cellos.UserSpec{}, fmt.Errorf("--user %q: want UID or UID:GID", s)
	}
	gid := uid
	if hasGID {
		if gid, err = strconv.ParseUint(gs, 10, 32); err != nil {
			return cellos.UserSpec{}, fmt.Errorf("--user %q: want UID or UID:GID", s)
		}
	}
	return cellos.UserSpec{UID: uint32(uid), GID: uint32(gid)}, nil
}

// parseSignal reads a signal by number or name, with or without the SIG prefix.
func parseSignal(s string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("%q is not a signal", s)
}
