package gvisor_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	"go.uber.org/zap"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// BuildSpec turns a document into the OCI config.json of its bundle. Without a rootfs the cell
// sees the host's system directories read-only; the inputs pin them here so that the output does
// not depend on the machine (a Backend uses gvisor.ProbeHostSystem()).
func ExampleBuildSpec() {
	doc, err := cellos.ParseDocument([]byte(`{
		"apiVersion": "cellos.dev/v1",
		"kind": "ExecutionCell",
		"spec": {
			"id": "example",
			"run": {"argv": ["/bin/sh", "-c", "echo hello > /out/greeting"]},
			"mounts": [{"type": "bind", "source": "/srv/out", "destination": "/out", "readOnly": false}],
			"labels": {"team": "ci"}
		}
	}`))
	if err != nil {
		log.Fatal(err)
	}
	spec := gvisor.BuildSpec(doc, gvisor.SpecInputs{HostSystem: []gvisor.HostEntry{
		{Path: "/usr", IsDir: true},
		{Path: "/bin", Symlink: "usr/bin"}, // recreated inside the root, not mounted
		{Path: "/etc/ld.so.cache"},
	}})

	fmt.Println("args:", spec.Process.Args)
	fmt.Printf("user: %d:%d\n", spec.Process.User.UID, spec.Process.User.GID)
	fmt.Println("root read-only:", spec.Root.Readonly)
	fmt.Println("hostname:", spec.Hostname)
	fmt.Println("label:", spec.Annotations[gvisor.AnnotationLabelPrefix+"team"])
	for _, m := range spec.Mounts {
		fmt.Println("mount:", m.Destination, m.Type, m.Options)
	}
	// Output:
	// args: [/bin/sh -c echo hello > /out/greeting]
	// user: 65534:65534
	// root read-only: true
	// hostname: example
	// label: ci
	// mount: /proc proc [nosuid noexec nodev]
	// mount: /sys sysfs [nosuid noexec nodev ro]
	// mount: /usr bind [rbind ro nosuid nodev]
	// mount: /etc/ld.so.cache bind [bind ro nosuid nodev]
	// mount: /tmp tmpfs [nosuid nodev mode=1777 size=536870912]
	// mount: /out bind [rbind rw nosuid nodev]
}

// A supervisor creates a cell, waits for it and tears it down. This needs runsc, so the example
// is compiled but not run.
func ExampleNew() {
	logger, err := zap.NewProduction()
	if err != nil {
		log.Fatal(err)
	}
	defer func() { _ = logger.Sync() }()

	b, err := gvisor.New(
		gvisor.WithLogger(logger),
		gvisor.WithOutput(func(cellID string) (stdout, stderr io.Writer) {
			return os.Stdout, os.Stderr // live copies; the bundle keeps stdout.log and stderr.log
		}),
	)
	if err != nil {
		log.Fatal(err)
	}

	doc := &cellos.ExecutionCellDocument{
		APIVersion: cellos.APIVersion,
		Kind:       cellos.Kind,
		Spec: cellos.CellSpec{
			ID:       "build-42",
			Run:      cellos.RunSpec{Argv: []string{"/bin/sh", "-c", "echo hello"}},
			Lifetime: &cellos.LifetimeSpec{TTLSeconds: 30},
		},
	}
	ctx := context.Background()
	h, err := b.Create(ctx, doc)
	if err != nil {
		log.Fatal(err) // errors.Is(err, cellos.ErrInvalidSpec), cellos.ErrHost, ...
	}
	// Tear down whatever happens next: Destroy is idempotent and removes the bundle.
	defer func() {
		report, err := b.Destroy(context.Background(), h)
		if err != nil {
			log.Print(err)
		}
		fmt.Println("destroyed:", report.Destroyed)
	}()

	waitCtx, cancel := context.WithTimeout(ctx, time.Minute) // ends the wait, not the cell
	defer cancel()
	status, err := b.WaitForExit(waitCtx, h.CellID)
	if err != nil {
		log.Print(err)
		return
	}
	fmt.Println("exit:", status.Code, status.Reason)
}
