package runsc

import (
	"context"
	"sync"
	"time"
)

// PerBinary runs a probe once per binary file and keeps its result: a replaced binary (another
// Key) is probed again, a failed probe is run again by the next caller. The probe runs detached
// from the caller's ctx, which bounds only the wait, so that a Create whose ctx ends early does
// not spoil the result for the next one. It is safe for concurrent use; Wait returns once no
// probe is under way.
type PerBinary[T any] struct {
	mu sync.Mutex
	m  map[Key]*perBinaryCall[T]
	wg sync.WaitGroup
}

type perBinaryCall[T any] struct {
	done chan struct{}
	v    T
	err  error
}

// Do returns probe's result for the binary key, running it (within timeout) unless a result of
// this very file is kept or under way. first is true for the caller whose call ran it. Results
// kept for older files at the same path are dropped.
func (p *PerBinary[T]) Do(ctx context.Context, key Key, timeout time.Duration, probe func(context.Context) (T, error)) (v T, first bool, err error) {
	p.mu.Lock()
	if p.m == nil {
		p.m = map[Key]*perBinaryCall[T]{}
	}
	call := p.m[key]
	if call != nil {
		select {
		case <-call.done:
			if call.err != nil {
				call = nil // failed: probe again
			}
		default:
		}
	}
	if call == nil {
		first = true
		for k := range p.m {
			if k.path == key.path && k != key {
				delete(p.m, k) // an older file at the same path
			}
		}
		call = &perBinaryCall[T]{done: make(chan struct{})}
		p.m[key] = call
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			pctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			call.v, call.err = probe(pctx)
			close(call.done)
		}()
	}
	p.mu.Unlock()
	select {
	case <-call.done:
		return call.v, first, call.err
	case <-ctx.Done():
		return v, false, ctx.Err()
	}
}

// Wait returns once no probe is under way.
func (p *PerBinary[T]) Wait() { p.wg.Wait() }
