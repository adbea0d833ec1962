package cellos

import (
	"errors"
	"fmt"
	"strings"
)

// The error kinds. Every error a backend returns wraps exactly one of them.
var (
	// ErrInvalidSpec: the document (or an id passed to an operation) is malformed or refers to
	// host paths that do not exist. Nothing was written to the host.
	ErrInvalidSpec = errors.New("invalid cell spec")
	// ErrHost: the host could not do what was asked (runtime missing or failing, disk not
	// writable, cgroups unavailable, the runtime's own failure while running a cell).
	ErrHost = errors.New("host failure")
	// ErrNotTracked: the backend does not know a cell by this id.
	ErrNotTracked = errors.New("cell not tracked")
	// ErrAlreadyExists: a cell with this id is tracked, being created or torn down, or has
	// leftovers on the host (bundle, runtime state, cgroups) that a Destroy must remove first.
	ErrAlreadyExists = errors.New("cell already exists")
	// ErrUnsupported: the document declares a limit or policy this backend cannot enforce.
	// Declared policies are enforced or refused, never ignored.
	ErrUnsupported = errors.New("unsupported by this backend")
)

// Error is the error type of the port: the operation, the cell, the kind and the cause.
type Error struct {
	Op     string // "create", "wait", "destroy", "validate", ...
	CellID string // may be empty when the document has no usable id
	Kind   error  // one of the kinds above
	Err    error  // the cause; may be nil
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Op)
	if e.CellID != "" {
		fmt.Fprintf(&b, " cell %q", e.CellID)
	}
	if e.Kind != nil {
		b.WriteString(": ")
		b.WriteString(e.Kind.Error())
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap exposes the kind and the cause to errors.Is and errors.As.
func (e *Error) Unwrap() []error {
	errs := make([]error, 0, 2)
	if e.Kind != nil {
		errs = append(errs, e.Kind)
	}
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	return errs
}

var kinds = []error{ErrInvalidSpec, ErrHost, ErrNotTracked, ErrAlreadyExists, ErrUnsupported}

// NewError builds an *Error. The cause is kept for errors.As; if it already carries one of the
// kinds (an *Error from a lower layer), a copy of that error is returned with op and cell filled
// in instead, so that the result wraps exactly one kind. The lower layer's error is not modified:
// it may be shared (a cell's recorded teardown error is returned to every caller). A cause that
// wraps a bare kind (fmt.Errorf("...: %w", ErrNotTracked)) likewise keeps its own kind.
func NewError(op, cellID string, kind, cause error) error {
	var inner *Error
	if errors.As(cause, &inner) && inner.Kind != nil {
		e := *inner
		if e.Op == "" {
			e.Op = op
		}
		if e.CellID == "" {
			e.CellID = cellID
		}
		return &e
	}
	for _, k := range kinds {
		if k != kind && errors.Is(cause, k) {
			kind = k
			break
		}
	}
	return &Error{Op: op, CellID: cellID, Kind: kind, Err: cause}
}

// Errorf is NewError with a formatted cause; %w verbs keep their operands unwrappable.
func Errorf(op, cellID string, kind error, format string, args ...any) error {
	return NewError(op, cellID, kind, fmt.Errorf(format, args...))
}

// FieldError is one problem with one field of a document, named by its JSON path.
type FieldError struct {
	Field  string // e.g. "spec.mounts[1].destination"
	Reason string
}

func (f FieldError) Error() string { return f.Field + ": " + f.Reason }

// FieldErrors lists every problem found in a document.
type FieldErrors []FieldError

func (fs FieldErrors) Error() string {
	parts := make([]string, len(fs))
	for i, f := range fs {
		parts[i] = f.Error()
	}
	return strings.Join(parts, "; ")
}

// Fields reports the JSON paths named by err's field errors, for callers that highlight them.
func Fields(err error) []string {
	var fs FieldErrors
	if errors.As(err, &fs) {
		out := make([]string, len(fs))
		for i, f := range fs {
			out[i] = f.Field
		}
		return out
	}
	var f FieldError
	if errors.As(err, &f) {
		return []string{f.Field}
	}
	return nil
}
