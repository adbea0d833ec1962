package main

// The verbs that start a cell in the foreground (run, and restore in operate.go, through
// runCell) or show what it would run with (config).

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

func (c *cli) runCommand() *command {
	cmd := newCommand("run")
	cmd.group = groupCell
	cmd.summary = "run a cell, stream its output, exit with its exit code"
	cmd.args = "DOC.json"
	cmd.long = `
Run creates the cell that the execution cell document DOC.json describes, copies its stdout and
stderr to cellrun's own and waits for it to end. Then it destroys the cell (unless --keep), prints
a one-line summary on stderr and exits with the cell's exit code (125 when cellrun, the document
or runsc failed). SIGINT (Ctrl-C), SIGTERM and SIGHUP destroy the cell, --keep or not.

A document whose root is an image the image store lacks has it pulled first, with the pull's
progress on stderr (as 'cellrun pull' shows it).

While it runs, the cell is one of the bundle root's: the operating verbs (exec, kill, stats, ...)
reach it by its id from another terminal.`
	cmd.check = exactly(1)
	cmd.run = c.foreground(cmd, func(b *gvisor.Backend, _ []string) launcher { return b.Create })
	return cmd
}

// launcher creates a cell: Create, or Restore from an image.
type launcher = func(context.Context, *cellos.ExecutionCellDocument) (cellos.CellHandle, error)

// foreground is the run of run and restore: the cell of DOC.json (the first argument) launched
// by what launch returns, run to its end with its output on cellrun's; --keep is cmd's flag.
func (c *cli) foreground(cmd *command, launch func(b *gvisor.Backend, args []string) launcher) func([]string) int {
	keep := cmd.flags.Bool("keep", false, "leave the bundle in place after the cell exits ('cellrun delete ID' removes it)")
	return func(args []string) int {
		doc, err := readDocument(args[0])
		if err != nil {
			return c.fail(err)
		}
		b, err := c.foregroundBackend()
		if err != nil {
			return c.fail(err)
		}
		if err := c.pullMissing(b, doc); err != nil {
			return c.fail(err)
		}
		return runCell(b, launch(b, args), doc, *keep, c.stderr)
	}
}

func (c *cli) configCommand() *command {
	cmd := newCommand("config")
	cmd.group = groupCell
	cmd.summary = "print the config.json a cell would run with; runs nothing"
	cmd.args = "DOC.json"
	cmd.long = `
Config prints the OCI runtime configuration (config.json) that run would give runsc for DOC.json,
with the global flags applied. It creates and runs nothing.`
	cmd.check = exactly(1)
	cmd.run = func(args []string) int {
		doc, err := readDocument(args[0])
		if err != nil {
			return c.fail(err)
		}
		b, err := gvisor.New(c.g.options()...)
		if err != nil {
			return c.fail(err)
		}
		data, err := b.Config(doc)
		if err != nil {
			return c.fail(err)
		}
		_, _ = c.stdout.Write(data)
		return 0
	}
	return cmd
}

// foregroundBackend is a Backend whose cells write to cellrun's stdout and stderr.
func (c *cli) foregroundBackend() (*gvisor.Backend, error) {
	return gvisor.New(append(c.g.options(),
		gvisor.WithOutput(func(string) (io.Writer, io.Writer) { return c.stdout, c.stderr }))...)
}

func readDocument(path string) (*cellos.ExecutionCellDocument, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, cellos.MaxDocumentBytes+1))
	if err != nil {
		return nil, err
	}
	doc, err := cellos.ParseDocument(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return doc, nil
}

// runCell runs the cell to its end. SIGINT, SIGTERM and SIGHUP destroy it.
func runCell(b *gvisor.Backend, launch func(context.Context, *cellos.ExecutionCellDocument) (cellos.CellHandle, error),
	doc *cellos.ExecutionCellDocument, keep bool, stderr io.Writer) int {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)

	start := time.Now()
	h, err := launch(context.Background(), doc)
	if err != nil {
		fmt.Fprintf(stderr, "cellrun: %v\n", err)
		return exitFailure
	}
	type result struct {
		st  cellos.ExitStatus
		err error
	}
	waited := make(chan result, 1)
	go func() {
		st, err := b.WaitForExit(context.Background(), h.CellID)
		waited <- result{st, err}
	}()
	var res result
	interrupted := false
	select {
	case res = <-waited:
	case sig := <-sigs:
		interrupted = true
		fmt.Fprintf(stderr, "cellrun: %v: destroying cell %q\n", sig, h.CellID)
	}
	elapsed := time.Since(start)
	if keep && !interrupted {
		fmt.Fprintf(stderr, "cellrun: cell %q %s in %s; bundle kept (cellrun delete %s removes it)\n",
			h.CellID, describe(res.st, res.err), elapsed.Round(time.Millisecond), h.CellID)
		return exitCode(res.st, res.err)
	}
	rep, derr := b.Destroy(context.Background(), h)
	if interrupted {
		res = <-waited
	}
	teardown := "destroyed"
	if !rep.Destroyed {
		teardown = "NOT destroyed"
	}
	fmt.Fprintf(stderr, "cellrun: cell %q %s in %s; teardown: %s, %d cells tracked after\n",
		h.CellID, describe(res.st, res.err), elapsed.Round(time.Millisecond), teardown, rep.PeersTrackedAfter)
	if derr != nil {
		fmt.Fprintf(stderr, "cellrun: %v\n", derr)
		return exitFailure
	}
	return exitCode(res.st, res.err)
}

func describe(st cellos.ExitStatus, err error) string {
	if err != nil {
		return "failed: " + err.Error()
	}
	if st.Signal != 0 {
		return fmt.Sprintf("ended: %s (code %d, signal %d)", st.Reason, st.Code, st.Signal)
	}
	return fmt.Sprintf("ended: %s (code %d)", st.Reason, st.Code)
}

// exitCode is the cell's exit code, or exitFailure when its end could not be read.
func exitCode(st cellos.ExitStatus, err error) int {
	if err != nil {
		return exitFailure
	}
	return st.Code
}
