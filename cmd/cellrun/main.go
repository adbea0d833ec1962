// Command cellrun runs CellOS execution cells under gVisor from a terminal, and operates on the
// cells of a bundle root whichever process created them:
//
//	cellrun [global flags] VERB [verb flags] ARGS
//
// `cellrun help` lists the verbs and the global flags, `cellrun help VERB` (or `cellrun VERB -h`)
// describes one verb; both are generated from the command table (command.go), which is also what
// parses the command line (cli.go). The global flags are accepted after the verb too.
//
// Exit codes: the cell's own exit code for run and restore, the process's for exec; 125 when
// cellrun, the document or runsc failed; 2 for usage errors.
package main

import (
	"io"
	"os"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run runs one command line and returns cellrun's exit code.
func run(args []string, stdout, stderr io.Writer) int {
	return newCLI(stdout, stderr).run(args)
}
