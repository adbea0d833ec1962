package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// The operator's commands work on the cells of a bundle root, whichever process created them (a
// running supervisor, a `cellrun run --keep`): each attaches to the cell (Backend.Attach), does
// its one thing and leaves the cell to its owner.

const operateUsage = `
operating on the cells of a bundle root (a running supervisor's, or cellrun run's):
  cellrun list [flags]                         the cells and their status
  cellrun exec [flags] [--user UID[:GID]] [--cwd DIR] [--env K=V]... ID -- ARGV...
                                               run ARGV inside the cell; exit with its exit code
  cellrun signal [flags] ID SIGNAL             send SIGNAL (TERM, SIGHUP, 9) to the cell's main process
  cellrun stats [flags] ID                     memory, CPU and task figures, as JSON
  cellrun pause [flags] ID                     freeze the cell
  cellrun resume [flags] ID                    thaw it
  cellrun checkpoint [flags] ID DIR            save the cell into DIR and stop it
  cellrun restore [flags] DOC.json DIR         run DOC's cell from the checkpoint in DIR, as run does
  cellrun destroy [flags] ID                   kill the cell and remove everything of it
`

// operateArgs is how many arguments each command takes after its flags (-1: at least one more).
var operateArgs = map[string]int{
	"list": 0, "exec": -1, "signal": 2, "stats": 1, "pause": 1, "resume": 1,
	"checkpoint": 2, "restore": 2, "destroy": 1,
}

// runOperate runs one of the operator's commands; ok is false when cmd is not one of them.
func runOperate(cmd string, args []string, stdout, stderr io.Writer) (code int, ok bool) {
	nargs, ok := operateArgs[cmd]
	if !ok {
		return 0, false
	}
	fs := flag.NewFlagSet("cellrun "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { usage(stderr) }
	bundleRoot := fs.String("bundle-root", "", "")
	runscPath := fs.String("runsc", "", "")
	debug := fs.Bool("debug", false, "")
	platform := fs.String("platform", "", "")
	keep := fs.Bool("keep", false, "")
	allowRoot := fs.Bool("allow-root", false, "")
	user := fs.String("user", "", "")
	cwd := fs.String("cwd", "", "")
	var env envFlag
	fs.Var(&env, "env", "")
	if err := fs.Parse(args); err != nil {
		return 2, true
	}
	rest := fs.Args()
	if (nargs >= 0 && len(rest) != nargs) || (nargs < 0 && len(rest) < 2) {
		usage(stderr)
		return 2, true
	}
	// One cell per invocation: a spare shim would only be started to be thrown away.
	opts := []gvisor.Option{gvisor.WithSpareShim(false), gvisor.WithAllowRoot(*allowRoot)}
	if *bundleRoot != "" {
		opts = append(opts, gvisor.WithBundleRoot(*bundleRoot))
	}
	if *runscPath != "" {
		opts = append(opts, gvisor.WithRunscPath(*runscPath))
	}
	if *platform != "" {
		opts = append(opts, gvisor.WithPlatform(*platform))
	}
	if *debug {
		cfg := zap.NewDevelopmentConfig()
		cfg.OutputPaths = []string{"stderr"}
		if l, err := cfg.Build(); err == nil {
			opts = append(opts, gvisor.WithLogger(l))
		}
	}
	if cmd == "restore" {
		doc, err := readDocument(rest[0])
		if err != nil {
			fmt.Fprintf(stderr, "cellrun: %v\n", err)
			return exitFailure, true
		}
		opts = append(opts, gvisor.WithOutput(func(string) (io.Writer, io.Writer) { return stdout, stderr }))
		b, err := gvisor.New(opts...)
		if err != nil {
			fmt.Fprintf(stderr, "cellrun: %v\n", err)
			return exitFailure, true
		}
		image := rest[1]
		restore := func(ctx context.Context, doc *cellos.ExecutionCellDocument) (cellos.CellHandle, error) {
			return b.Restore(ctx, doc, image)
		}
		return runCell(b, restore, doc, *keep, stderr), true
	}
	b, err := gvisor.New(opts...)
	if err != nil {
		fmt.Fprintf(stderr, "cellrun: %v\n", err)
		return exitFailure, true
	}
	fail := func(err error) (int, bool) {
		fmt.Fprintf(stderr, "cellrun: %v\n", err)
		return exitFailure, true
	}
	ctx := context.Background()
	if cmd == "list" {
		cells, err := b.List(ctx)
		if err != nil {
			return fail(err)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tSTATUS\tEXIT")
		for _, c := range cells {
			exit := ""
			if c.Exit != nil {
				exit = fmt.Sprintf("%s %d", c.Exit.Reason, c.Exit.Code)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", c.ID, c.Status, exit)
		}
		_ = tw.Flush()
		return 0, true
	}
	id := rest[0]
	if _, err := b.Attach(ctx, id); err != nil && (cmd != "destroy" || !errors.Is(err, cellos.ErrNotTracked)) {
		return fail(err) // destroy also removes what is left of a cell no shim runs
	}
	switch cmd {
	case "exec":
		argv := rest[1:]
		if argv[0] == "--" {
			argv = argv[1:]
		}
		run := cellos.RunSpec{Argv: argv, Env: env.vars, WorkingDir: *cwd}
		if *user != "" {
			u, err := parseUser(*user)
			if err != nil {
				return fail(err)
			}
			run.User = &u
		}
		ictx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
		defer stop()
		st, err := b.Exec(ictx, id, run, stdout, stderr)
		if err != nil {
			if ictx.Err() != nil && ctx.Err() == nil {
				fmt.Fprintf(stderr, "cellrun: interrupted: the process was killed\n")
				return 128 + int(syscall.SIGINT), true
			}
			return fail(err)
		}
		return st.Code, true
	case "signal":
		sig, err := parseSignal(rest[1])
		if err != nil {
			return fail(err)
		}
		if err := b.Signal(ctx, id, sig); err != nil {
			return fail(err)
		}
	case "stats":
		st, err := b.Stats(ctx, id)
		if err != nil {
			return fail(err)
		}
		data, _ := json.MarshalIndent(st, "", "  ")
		fmt.Fprintf(stdout, "%s\n", data)
	case "pause":
		if err := b.Pause(ctx, id); err != nil {
			return fail(err)
		}
	case "resume":
		if err := b.Resume(ctx, id); err != nil {
			return fail(err)
		}
	case "checkpoint":
		if err := b.Checkpoint(ctx, id, rest[1]); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stderr, "cellrun: cell %q checkpointed to %s and stopped; `cellrun restore DOC.json %s` runs it on\n", id, rest[1], rest[1])
	case "destroy":
		rep, err := b.Destroy(ctx, cellos.CellHandle{CellID: id})
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(stderr, "cellrun: cell %q destroyed: %v\n", id, rep.Destroyed)
	}
	return 0, true
}

// envFlag collects --env KEY=VALUE flags.
type envFlag struct{ vars map[string]string }

func (e *envFlag) String() string { return "" }

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
