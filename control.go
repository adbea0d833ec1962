package gvisor

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/ctlns"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
)

// runsc's control sockets. Each sandbox serves a control RPC — exec, signal, checkpoint — that
// the runsc CLI connects to. Debian's 2022 runsc binds it as an abstract Unix socket
// (@runsc-sandbox.<id>) in the network namespace of the runsc process that started the sandbox:
// abstract sockets have no permissions, so any local user in that namespace could exec a shell
// as root inside a root-run cell. Current runsc uses a file socket in the 0700 state root.
//
// As root the library runs every runsc process of a cell in a network namespace of the cell's own
// (runsc.NetNS, pinned in its bundle), where nobody else can connect; with a current runsc that
// costs ~0.1 ms per runsc invocation and changes nothing else. Without root it cannot make
// namespaces: it finds out, once per runsc binary, whether the binary serves abstract sockets
// (a trial sandbox), and refuses cells on one that does unless WithUnconfinedControlSockets.

// abstractProbeTimeout bounds the trial (Debian's runsc takes ~2 s, most of it its delete).
const abstractProbeTimeout = 60 * time.Second

// checkControlSockets refuses a cell whose sandbox's control socket other local users could
// reach.
func (b *Backend) checkControlSockets(ctx context.Context, cellID string, loc location) error {
	if b.root || b.opts.sharedSocket {
		return nil
	}
	abstract, err := b.servesAbstract(ctx, loc)
	if err != nil {
		return cellos.NewError("create", cellID, cellos.ErrHost, fmt.Errorf("finding out how runsc serves its control sockets: %w", err))
	}
	if abstract {
		return cellos.Errorf("create", cellID, cellos.ErrHost,
			"runsc %s serves each sandbox's control RPC on an abstract Unix socket, which every local user can reach "+
				"(exec into the cell, signal it); as root the library confines it to a network namespace of the cell's own, "+
				"without root it cannot. Run the supervisor as root, use a runsc that keeps its control sockets in its state "+
				"root (current gVisor releases), or accept the exposure with WithUnconfinedControlSockets(true)", loc.runsc.Path)
	}
	return nil
}

// servesAbstract runs the trial of loc's runsc once per binary file and returns its result.
func (b *Backend) servesAbstract(ctx context.Context, loc location) (bool, error) {
	key, err := runsc.KeyOf(loc.runsc.Path)
	if err != nil {
		return false, err
	}
	r, host := *loc.runsc, b.host
	abstract, _, err := b.ctl.Do(ctx, key, abstractProbeTimeout, func(ctx context.Context) (bool, error) {
		return probeAbstract(ctx, r, host)
	})
	return abstract, err
}

// probeAbstract starts a trial sandbox (a sleep) from a bundle of its own and reports whether it
// serves an abstract control socket.
func probeAbstract(ctx context.Context, r runsc.Runsc, host []HostEntry) (bool, error) {
	tmp, err := os.MkdirTemp("", "cellos-ctlprobe-")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(tmp)
	top, err := owned.Ensure(tmp, 0o700)
	if err != nil {
		return false, err
	}
	defer top.Close()
	rootfs, err := top.Mkdir(bundle.Rootfs, 0o755)
	if err != nil {
		return false, err
	}
	defer rootfs.Close()
	doc := &cellos.ExecutionCellDocument{APIVersion: cellos.APIVersion, Kind: cellos.Kind,
		Spec: cellos.CellSpec{ID: "ctlprobe", Run: cellos.RunSpec{Argv: []string{"/bin/sleep", "60"}}}}
	if err := bundle.WriteRootfs(rootfs, &doc.Spec, host); err != nil {
		return false, err
	}
	data, err := MarshalSpec(BuildSpec(doc, SpecInputs{HostSystem: host}))
	if err != nil {
		return false, err
	}
	if err := top.WriteFile(bundle.Config, data, 0o644); err != nil {
		return false, err
	}
	var extra []string
	if r.Platform != "" {
		extra = append(extra, "--platform="+r.Platform)
	}
	return ctlns.ProbeAbstract(ctx, func(ctx context.Context, args ...string) (string, error) {
		return r.Output(ctx, tmp, args...)
	}, tmp, extra...)
}
