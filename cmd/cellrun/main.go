// Command cellrun runs one CellOS execution cell under gVisor from a terminal.
//
//	cellrun run [flags] DOC.json     run the cell, stream its output, exit with its exit code
//	cellrun config [flags] DOC.json  print the config.json the cell would run with
//	cellrun list|exec|signal|stats|pause|resume|checkpoint|restore|destroy [flags] ...
//	                                 operate on the cells of a bundle root (operate.go)
//
// Exit codes: the cell's own exit code for `run`; 125 when cellrun, the document or runsc
// failed; 2 for usage errors.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// exitFailure is cellrun's exit code when it, the document or runsc failed.
const exitFailure = 125

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage:
  cellrun run [flags] DOC.json      run one cell, stream its output, exit with its exit code
  cellrun config [flags] DOC.json   print the config.json the cell would run with

flags:
  --bundle-root DIR   where bundles live (default $CELLOS_GVISOR_BUNDLE_ROOT, else /run/cellos-gvisor for root)
  --runsc PATH        the runsc binary (default $CELLOS_GVISOR_RUNSC_BIN or runsc on $PATH)
  --platform NAME     runsc platform (ptrace, systrap)
  --keep              run: leave the bundle in place after the cell exits (destroy it later)
  --allow-root        let the cell's process (or an exec'd one) run as uid or gid 0 inside the cell
  --debug             log what the library does to stderr
`+operateUsage)
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	cmd, rest := args[0], args[1:]
	if code, ok := runOperate(cmd, rest, stdout, stderr); ok {
		return code
	}
	fs := flag.NewFlagSet("cellrun "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { usage(stderr) }
	bundleRoot := fs.String("bundle-root", "", "")
	runscPath := fs.String("runsc", "", "")
	platform := fs.String("platform", "", "")
	keep := fs.Bool("keep", false, "")
	debug := fs.Bool("debug", false, "")
	allowRoot := fs.Bool("allow-root", false, "")
	if err := fs.Parse(rest); err != nil {
		return 2
	}
	if fs.NArg() != 1 {
		usage(stderr)
		return 2
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
	doc, err := readDocument(fs.Arg(0))
	if err != nil {
		fmt.Fprintf(stderr, "cellrun: %v\n", err)
		return exitFailure
	}
	switch cmd {
	case "config":
		b, err := gvisor.New(opts...)
		if err != nil {
			fmt.Fprintf(stderr, "cellrun: %v\n", err)
			return exitFailure
		}
		data, err := b.Config(doc)
		if err != nil {
			fmt.Fprintf(stderr, "cellrun: %v\n", err)
			return exitFailure
		}
		_, _ = stdout.Write(data)
		return 0
	case "run":
		opts = append(opts, gvisor.WithOutput(func(string) (io.Writer, io.Writer) { return stdout, stderr }))
		b, err := gvisor.New(opts...)
		if err != nil {
			fmt.Fprintf(stderr, "cellrun: %v\n", err)
			return exitFailure
		}
		return runCell(b, b.Create, doc, *keep, stderr)
	default:
		fmt.Fprintf(stderr, "cellrun: unknown command %q\n", cmd)
		usage(stderr)
		return 2
	}
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
		fmt.Fprintf(stderr, "cellrun: cell %q %s in %s; bundle kept (destroy it with the library or runsc)\n",
			h.CellID, describe(res.st, res.err), elapsed.Round(time.Millisecond))
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

func exitCode(st cellos.ExitStatus, err error) int {
	if err != nil {
		if errors.Is(err, cellos.ErrHost) {
			return exitFailure
		}
		return exitFailure
	}
	return st.Code
}
