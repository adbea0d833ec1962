package cellos_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

var allKinds = []error{cellos.ErrInvalidSpec, cellos.ErrHost, cellos.ErrNotTracked, cellos.ErrAlreadyExists, cellos.ErrUnsupported}

// kindsOf lists the kinds err wraps.
func kindsOf(err error) []error {
	var out []error
	for _, k := range allKinds {
		if errors.Is(err, k) {
			out = append(out, k)
		}
	}
	return out
}

func TestErrorMessage(t *testing.T) {
	cases := []struct {
		name string
		err  *cellos.Error
		want string
	}{
		{"all parts", &cellos.Error{Op: "create", CellID: "c1", Kind: cellos.ErrHost, Err: fs.ErrPermission},
			`create cell "c1": host failure: permission denied`},
		{"no cell", &cellos.Error{Op: "parse", Kind: cellos.ErrInvalidSpec, Err: errors.New("bad")},
			`parse: invalid cell spec: bad`},
		{"no cause", &cellos.Error{Op: "wait", CellID: "c2", Kind: cellos.ErrNotTracked},
			`wait cell "c2": cell not tracked`},
		{"cell id quoted", &cellos.Error{Op: "destroy", CellID: "a.b", Kind: cellos.ErrAlreadyExists},
			`destroy cell "a.b": cell already exists`},
		{"no kind does not panic", &cellos.Error{Op: "x", CellID: "c", Err: errors.New("cause")},
			`x cell "c": cause`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, tc.err.Error())
		})
	}
}

func TestErrorIsAs(t *testing.T) {
	cause := &fs.PathError{Op: "open", Path: "/x", Err: fs.ErrNotExist}
	err := fmt.Errorf("outer: %w", cellos.NewError("create", "c1", cellos.ErrHost, cause))

	assert.ErrorIs(t, err, cellos.ErrHost)
	assert.ErrorIs(t, err, fs.ErrNotExist, "the cause stays reachable")
	assert.Equal(t, []error{cellos.ErrHost}, kindsOf(err))

	var e *cellos.Error
	require.ErrorAs(t, err, &e)
	assert.Equal(t, "create", e.Op)
	assert.Equal(t, "c1", e.CellID)
	assert.Equal(t, cellos.ErrHost, e.Kind)
	assert.Same(t, cause, e.Err)

	var pe *fs.PathError
	require.ErrorAs(t, err, &pe)
	assert.Equal(t, "/x", pe.Path)

	msg := err.Error()
	assert.Contains(t, msg, "create")
	assert.Contains(t, msg, `"c1"`)
	assert.Contains(t, msg, "/x")
}

func TestNewErrorKeepsExactlyOneKind(t *testing.T) {
	t.Run("cause is an *Error", func(t *testing.T) {
		inner := &cellos.Error{Op: "validate", CellID: "c1", Kind: cellos.ErrInvalidSpec,
			Err: cellos.FieldErrors{{Field: "spec.id", Reason: "bad"}}}
		err := cellos.NewError("create", "c1", cellos.ErrHost, inner)
		assert.Equal(t, []error{cellos.ErrInvalidSpec}, kindsOf(err))
		assert.Equal(t, []string{"spec.id"}, cellos.Fields(err))
		var e *cellos.Error
		require.ErrorAs(t, err, &e)
		assert.Equal(t, "validate", e.Op, "the lower layer's op is kept")
	})
	t.Run("cause wraps an *Error", func(t *testing.T) {
		inner := &cellos.Error{Op: "wait", CellID: "c1", Kind: cellos.ErrNotTracked}
		err := cellos.NewError("destroy", "c1", cellos.ErrHost, fmt.Errorf("looking up: %w", inner))
		assert.Equal(t, []error{cellos.ErrNotTracked}, kindsOf(err))
	})
	t.Run("op and cell filled in without touching the cause", func(t *testing.T) {
		inner := &cellos.Error{Kind: cellos.ErrUnsupported, Err: errors.New("pids")}
		err := cellos.NewError("create", "c9", cellos.ErrHost, inner)
		assert.Equal(t, []error{cellos.ErrUnsupported}, kindsOf(err))
		assert.Equal(t, `create cell "c9": unsupported by this backend: pids`, err.Error())
		assert.Empty(t, inner.Op, "a shared lower-layer error must not be modified")
		assert.Empty(t, inner.CellID)

		// The same lower-layer error handed to two callers keeps each caller's context.
		other := cellos.NewError("config", "c8", cellos.ErrHost, inner)
		assert.Equal(t, `config cell "c8": unsupported by this backend: pids`, other.Error())
		assert.Equal(t, `create cell "c9": unsupported by this backend: pids`, err.Error())
	})
	t.Run("cause wraps a bare kind", func(t *testing.T) {
		err := cellos.Errorf("wait", "c1", cellos.ErrHost, "lookup: %w", cellos.ErrNotTracked)
		assert.Equal(t, []error{cellos.ErrNotTracked}, kindsOf(err))
	})
	t.Run("cause without a kind", func(t *testing.T) {
		err := cellos.NewError("wait", "c1", cellos.ErrHost, context.DeadlineExceeded)
		assert.Equal(t, []error{cellos.ErrHost}, kindsOf(err))
		assert.ErrorIs(t, err, context.DeadlineExceeded)
	})
	t.Run("nil cause", func(t *testing.T) {
		err := cellos.NewError("destroy", "c1", cellos.ErrNotTracked, nil)
		assert.Equal(t, []error{cellos.ErrNotTracked}, kindsOf(err))
		assert.Equal(t, `destroy cell "c1": cell not tracked`, err.Error())
	})
	t.Run("every kind", func(t *testing.T) {
		for _, k := range allKinds {
			err := cellos.Errorf("op", "c", k, "because %d", 7)
			assert.Equal(t, []error{k}, kindsOf(err))
			assert.Equal(t, fmt.Sprintf(`op cell "c": %v: because 7`, k), err.Error())
		}
	})
}

func TestErrorfWrapsOperands(t *testing.T) {
	err := cellos.Errorf("create", "c1", cellos.ErrHost, "mkdir %s: %w", "/b", fs.ErrExist)
	assert.ErrorIs(t, err, fs.ErrExist)
	assert.ErrorIs(t, err, cellos.ErrHost)
	assert.Contains(t, err.Error(), "mkdir /b: file already exists")
}

func TestFields(t *testing.T) {
	assert.Nil(t, cellos.Fields(nil))
	assert.Nil(t, cellos.Fields(errors.New("plain")))
	assert.Equal(t, []string{"spec.id"}, cellos.Fields(cellos.FieldError{Field: "spec.id", Reason: "bad"}))
	assert.Equal(t, []string{"spec.id"}, cellos.Fields(&cellos.Error{Op: "x", Kind: cellos.ErrInvalidSpec,
		Err: fmt.Errorf("wrapped: %w", cellos.FieldError{Field: "spec.id", Reason: "bad"})}))
	fes := cellos.FieldErrors{{Field: "a", Reason: "r1"}, {Field: "b.c[0]", Reason: "r2"}}
	assert.Equal(t, []string{"a", "b.c[0]"}, cellos.Fields(&cellos.Error{Op: "x", Kind: cellos.ErrInvalidSpec, Err: fes}))
	assert.Equal(t, "a: r1; b.c[0]: r2", fes.Error())
}
