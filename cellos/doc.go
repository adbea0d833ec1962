// Package cellos is the port shared by every CellOS backend: the execution cell document, the
// CellBackend interface a supervisor drives, and the values and error kinds it returns.
//
// A backend turns an ExecutionCellDocument into a running, isolated workload (a cell), reports how
// it ended, and tears it down. Documents are parsed strictly (ParseDocument) and validated before a
// backend touches the host (Validate); a supervisor that builds documents in Go gets the same
// validation from Create.
//
// Every error returned by this package and by backends wraps exactly one of the kinds ErrInvalidSpec,
// ErrHost, ErrNotTracked, ErrAlreadyExists or ErrUnsupported; match them with errors.Is. The message
// names the operation, the cell and, for document errors, the offending field.
package cellos
