package gvisor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cellos/cellos-host-gvisor/internal/pool"
	"github.com/cellos/cellos-host-gvisor/internal/shim"

	"github.com/cellos/cellos-host-gvisor/internal/bundle"

	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/cgroups"
	"github.com/cellos/cellos-host-gvisor/internal/ctlns"
	"github.com/cellos/cellos-host-gvisor/internal/follow"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
	"github.com/cellos/cellos-host-gvisor/internal/proc"
)

// Backend runs cells under gVisor's runsc. It is safe for concurrent use.
type Backend struct {
	opts  options
	log   *zap.Logger
	host  []HostEntry      // the host system paths cells without rootfs see
	cg    *cgroups.Manager // nil when no cgroup hierarchy is mounted
	cells *tracker
	root  bool // the library runs as root

	prober    runsc.Prober              // what each runsc binary said of itself (probe.go)
	probed    probeLog                  // the runsc binaries whose probe this Backend has logged
	ctl       runsc.PerBinary[bool]     // which runsc binaries serve abstract control sockets (control.go)
	netProbes runsc.PerBinary[netProbe] // which runsc binaries can run cells with sandbox networking (network.go)
	pool      *pool.Pool                // WithWarmPool's idle sandboxes (pooled.go); nil without
	spares    *shim.Spares              // the shim started ahead of the next Create
	images    imageState                // the image store, opened at its first use (image.go)
}

var _ cellos.CellBackend = (*Backend)(nil)

// Bounds on teardown steps, so that a hung runsc cannot hang Destroy.
const (
	runscTimeout   = 15 * time.Second
	shimExitGrace  = 10 * time.Second
	killGrace      = 5 * time.Second
	cgroupRmTimout = 5 * time.Second
)

// New returns a Backend. It does not look for runsc: that happens at every Create, so that the
// environment overrides apply.
func New(opts ...Option) (*Backend, error) {
	o := options{outputCap: DefaultOutputCap, minFree: DefaultMinFreeSpace, defaults: DefaultLimits}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, fmt.Errorf("gvisor.New: %w", err)
		}
	}
	if o.logger == nil {
		o.logger = zap.NewNop()
	}
	b := &Backend{opts: o, log: o.logger, host: ProbeHostSystem(), cells: newTracker(), root: os.Geteuid() == 0}
	if cg, err := cgroups.Detect(); err == nil && cg.Available() {
		b.cg = cg
	}
	if (b.cg == nil || !b.root) && !o.defaultsSet && (o.defaults.MemoryBytes > 0 || o.defaults.CPUMillis > 0) {
		// The library's own defaults cannot be enforced here; an operator's would be refused.
		b.log.Warn("cells without declared limits run without memory and CPU limits: cgroups need root and a mounted hierarchy",
			zap.Int64("defaultMemoryBytes", o.defaults.MemoryBytes), zap.Int64("defaultCpuMillis", o.defaults.CPUMillis))
		b.opts.defaults.MemoryBytes, b.opts.defaults.CPUMillis = 0, 0
	}
	b.spares = shim.NewSpares(o.noSpare)
	b.pool = pool.New(poolEnv{b}, pool.Config{Size: o.warmPool, Host: b.host, Cgroups: b.cg, Log: b.log,
		Limits: cgroups.Limits{MemoryBytes: b.opts.defaults.MemoryBytes, CPUMillis: b.opts.defaults.CPUMillis}}) // fills in the background
	return b, nil
}

// location is where cells live for one operation: the runsc to use and the bundle root.
type location struct {
	runsc    *runsc.Runsc
	root     string
	runscErr error // why runsc cannot be used; management of leftovers goes on without it
}

// DefaultBundleRoot is the bundle root without WithBundleRoot or CELLOS_GVISOR_BUNDLE_ROOT:
// $TMPDIR/cellos-gvisor when TMPDIR is set; otherwise a directory other users cannot write
// to: /run/cellos-gvisor for root, $XDG_RUNTIME_DIR/cellos-gvisor for a user who has one;
// /tmp/cellos-gvisor only when there is neither (the library then creates it, or refuses it
// when someone else did).
func DefaultBundleRoot() string {
	const name = "cellos-gvisor"
	if tmp := os.Getenv("TMPDIR"); tmp != "" {
		return filepath.Join(tmp, name)
	}
	if os.Geteuid() == 0 {
		if fi, err := os.Stat("/run"); err == nil && fi.IsDir() {
			return filepath.Join("/run", name)
		}
	} else if xdg := os.Getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(xdg) {
		return filepath.Join(xdg, name)
	}
	return filepath.Join("/tmp", name)
}

// locate resolves the environment overrides and the options.
func (b *Backend) locate() location {
	root := os.Getenv(EnvBundleRoot)
	if root == "" {
		root = b.opts.bundleRoot
	}
	if root == "" {
		root = DefaultBundleRoot()
	}
	if abs, err := filepath.Abs(root); err == nil {
		root = abs
	}
	state := b.opts.stateRoot
	if state == "" {
		state = filepath.Join(root, ".runsc")
	}
	bin := os.Getenv(EnvRunscBin)
	if bin == "" {
		bin = b.opts.runscPath
	}
	if bin == "" {
		bin = "runsc"
	}
	loc := location{root: root, runsc: &runsc.Runsc{Root: state, Platform: b.opts.platform, Rootless: !b.root, Extra: b.opts.runscFlags}}
	path, err := exec.LookPath(bin)
	if err == nil {
		path, err = filepath.Abs(path)
	}
	if err != nil {
		loc.runscErr = fmt.Errorf("runsc binary %q: %w (install it with `apt-get install runsc`, or set %s)", bin, err, EnvRunscBin)
	}
	loc.runsc.Path = path
	return loc
}

// newCell is what the Backend knows of cell id before anything of it is opened: its paths, its
// runsc id and its runsc (with the control namespace it gets inside its bundle).
func (b *Backend) newCell(id string, loc location) *cell {
	bpath := filepath.Join(loc.root, id)
	r := *loc.runsc
	if b.root {
		r.NetNS = filepath.Join(bpath, bundle.ControlNetns)
	}
	return &cell{
		id:     id,
		paths:  cellPaths{root: loc.root, bundle: bpath, runscID: RunscID(loc.root, id)},
		runsc:  &r,
		ready:  make(chan struct{}),
		exited: make(chan struct{}),
	}
}

// openBundle opens the existing bundle of c (an untracked cell: Destroy, Recover, Attach) under
// the ownership rule and completes what the Backend knows of it from the directory itself: the
// runsc id of a cell in a warm-pool sandbox (derived from the directory, never read from a file)
// and whether its control namespace exists.
func (b *Backend) openBundle(c *cell, root *owned.Dir) (*owned.Dir, error) {
	dir, err := root.OpenDir(c.id)
	if err != nil {
		return nil, err
	}
	if _, err := dir.Lstat(bundle.SandboxSpec); err == nil {
		dev, ino := dir.Ident()
		c.paths.runscID = runsc.PoolID(c.paths.root, dev, ino)
	}
	if _, err := dir.Lstat(bundle.ControlNetns); err != nil {
		c.runsc.NetNS = "" // none was made (or it is gone): runsc's state is reached from here
	}
	c.dir = dir
	return dir, nil
}

// Create validates doc, writes the cell's bundle, starts runsc under a shim and returns. ctx
// bounds Create only. On any failure nothing of the cell is left on the host.
func (b *Backend) Create(ctx context.Context, doc *cellos.ExecutionCellDocument) (cellos.CellHandle, error) {
	return b.launch(ctx, "create", doc, "")
}

// launch creates a cell that runs doc's process or, with an image, one restored from that
// checkpoint (Restore).
func (b *Backend) launch(ctx context.Context, op string, doc *cellos.ExecutionCellDocument, image string) (cellos.CellHandle, error) {
	if err := doc.Validate(); err != nil {
		return cellos.CellHandle{}, relabel(err, op)
	}
	doc = b.withDefaults(doc)
	s := &doc.Spec
	if err := b.supports(s); err != nil {
		return cellos.CellHandle{}, cellos.NewError(op, s.ID, cellos.ErrUnsupported, err)
	}
	if err := b.checkHost(s); err != nil {
		return cellos.CellHandle{}, relabel(err, op)
	}
	loc := b.locate()
	sources, err := b.checkPolicy(s, loc)
	if err != nil {
		return cellos.CellHandle{}, relabel(err, op)
	}
	if loc.runscErr != nil {
		return cellos.CellHandle{}, cellos.NewError(op, s.ID, cellos.ErrHost, loc.runscErr)
	}
	if err := b.useRuntime(ctx, s, &loc); err != nil { // probes the binary once, then cached
		return cellos.CellHandle{}, relabel(err, op)
	}
	if err := b.checkControlSockets(ctx, s.ID, loc); err != nil {
		return cellos.CellHandle{}, relabel(err, op)
	}
	var img *imageCell
	if s.Rootfs != nil && s.Rootfs.Image != "" {
		if img, err = b.useImage(ctx, op, doc, true); err != nil { // pulls what the store lacks
			return cellos.CellHandle{}, err
		}
		defer img.release() // once the cell's root is mounted, the mount keeps the layers
		doc, s = img.doc, &img.doc.Spec
		if sources, err = b.checkPolicy(s, loc); err != nil { // the image's user, too
			return cellos.CellHandle{}, relabel(err, op)
		}
	}
	nw, err := b.planNetwork(ctx, s, loc) // nil, at no cost, for a cell without egress rules
	if err != nil {
		return cellos.CellHandle{}, relabel(err, op)
	}
	c := b.newCell(s.ID, loc)
	c.net, c.sources = nw, sources
	if img != nil {
		c.layers = img.layers
		c.handle.RootfsDigestSHA256 = &img.digest
	}
	if other := b.cells.claim(c); other != nil {
		return cellos.CellHandle{}, cellos.Errorf(op, s.ID, cellos.ErrAlreadyExists, "a cell with this id is tracked or being torn down")
	}
	start := time.Now()
	pooled, err := b.createFromPool(ctx, c, doc, image) // pool.go: false when the cell starts cold
	if !pooled {
		err = b.create(ctx, c, doc, image)
	}
	if err != nil {
		b.cells.release(c)
		close(c.ready)
		b.log.Info("cell create failed", zap.String("cell", s.ID), zap.Error(err))
		return cellos.CellHandle{}, relabel(err, op)
	}
	c.created = true
	close(c.ready)
	b.log.Info("cell created", zap.String("cell", s.ID), zap.String("runscId", c.paths.runscID),
		zap.String("bundle", c.paths.bundle), zap.Int("shimPid", c.pid.Pid), zap.Duration("took", time.Since(start)))
	return c.handle, nil
}

// supports refuses what this backend cannot enforce.
func (b *Backend) supports(s *cellos.CellSpec) error {
	if s.Resources != nil && s.Resources.Pids > 0 {
		return cellos.FieldError{Field: "spec.resources.pids",
			Reason: "a pids limit is not supported: runsc counts its own threads against it and the sandbox breaks; use 0"}
	}
	return egressSupported(s)
}

// checkHost checks what the document asks of the host, before anything is written.
func (b *Backend) checkHost(s *cellos.CellSpec) error {
	var errs cellos.FieldErrors
	host := false
	if r := s.Rootfs; r != nil && r.Image != "" {
		if !b.root {
			host = true
			errs = append(errs, cellos.FieldError{Field: "spec.rootfs.image", Reason: "an image root needs an overlay mount, which needs root"})
		}
	} else if r != nil {
		if fi, err := os.Stat(r.Path); err != nil {
			errs = append(errs, cellos.FieldError{Field: "spec.rootfs.path", Reason: statReason(err)})
		} else if !fi.IsDir() {
			errs = append(errs, cellos.FieldError{Field: "spec.rootfs.path", Reason: fmt.Sprintf("%q is not a directory", r.Path)})
		} else if err := bundle.CheckImagePath(r.Path); err != nil {
			errs = append(errs, cellos.FieldError{Field: "spec.rootfs.path", Reason: err.Error()})
		} else if !b.root {
			host = true
			errs = append(errs, cellos.FieldError{Field: "spec.rootfs.path", Reason: "an image root needs an overlay mount, which needs root"})
		}
	}
	for i, m := range s.Mounts {
		if m.Type != cellos.MountBind {
			continue
		}
		if _, err := os.Stat(m.Source); err != nil {
			errs = append(errs, cellos.FieldError{Field: fmt.Sprintf("spec.mounts[%d].source", i), Reason: statReason(err)})
		}
	}
	if s.WantsCgroups() && (b.cg == nil || !b.root) {
		host = true
		errs = append(errs, cellos.FieldError{Field: "spec.resources",
			Reason: "memory and CPU limits need cgroups, which need root and a mounted cgroup hierarchy (limits the operator set as defaults count too: WithDefaultResources)"})
	}
	if len(errs) == 0 {
		return nil
	}
	kind := cellos.ErrInvalidSpec
	if host {
		kind = cellos.ErrHost
	}
	return &cellos.Error{Op: "create", CellID: s.ID, Kind: kind, Err: errs}
}

func statReason(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return fmt.Sprintf("%q: %v", pe.Path, pe.Err)
	}
	return err.Error()
}

// openRoots opens the bundle root and the runsc state root under the ownership rule, creating
// them when they do not exist. The state root is only checked: runsc opens it by path. Nothing is
// created when either is refused.
func openRoots(loc location) (*owned.Dir, error) {
	if err := owned.Check(loc.runsc.Root); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("runsc state root: %w", err)
	}
	_, statErr := os.Lstat(loc.root)
	root, err := owned.Ensure(loc.root, 0o711)
	if err != nil {
		return nil, fmt.Errorf("bundle root: %w", err)
	}
	state, err := owned.Ensure(loc.runsc.Root, 0o700)
	if err != nil {
		if statErr != nil { // made just now: leave nothing
			_ = os.Remove(loc.root)
		}
		_ = root.Close()
		return nil, fmt.Errorf("runsc state root: %w", err)
	}
	_ = state.Close()
	return root, nil
}

// openExistingRoot opens the bundle root for an operation that only looks at what is there: nil
// without error when it does not exist; an error when it exists but breaks the ownership rule.
func openExistingRoot(loc location) (*owned.Dir, error) {
	root, err := owned.Open(loc.root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("bundle root: %w", err)
	}
	if err := owned.Check(loc.runsc.Root); err != nil && !errors.Is(err, fs.ErrNotExist) {
		_ = root.Close()
		return nil, fmt.Errorf("runsc state root: %w", err)
	}
	return root, nil
}

// create does the work of Create once the id is claimed.
func (b *Backend) create(ctx context.Context, c *cell, doc *cellos.ExecutionCellDocument, image string) (err error) {
	s, p := &doc.Spec, c.paths
	fail := func(kind error, format string, args ...any) error {
		return cellos.Errorf("create", s.ID, kind, format, args...)
	}
	root, err := openRoots(location{root: p.root, runsc: c.runsc})
	if err != nil {
		return fail(cellos.ErrHost, "%w", err)
	}
	defer root.Close()
	if err := b.checkFreeSpace(p.root); err != nil {
		return fail(cellos.ErrHost, "%w", err)
	}
	if files := c.runsc.StateFiles(p.runscID); len(files) > 0 {
		return fail(cellos.ErrAlreadyExists, "runsc still holds state of an earlier cell with this id (%s); Destroy or Recover removes it", files[0])
	}
	wantsCg := s.WantsCgroups()
	if wantsCg {
		if dirs := b.cg.Dirs(p.runscID); len(dirs) > 0 {
			return fail(cellos.ErrAlreadyExists, "cgroup %s exists; Destroy or Recover removes it", dirs[0])
		}
	}
	dir, err := root.Mkdir(s.ID, 0o700)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fail(cellos.ErrAlreadyExists, "%s exists; Destroy or Recover removes it", p.bundle)
		}
		return fail(cellos.ErrHost, "bundle directory: %w", err)
	}
	c.dir = dir
	defer func() {
		if err != nil {
			if cerr := b.undoCreate(c, root, wantsCg); cerr != nil {
				b.log.Error("cleaning up after a failed create", zap.String("cell", s.ID), zap.Error(cerr))
			}
		}
	}()
	if err := b.writeBundle(c, dir, doc, wantsCg); err != nil {
		return fail(cellos.ErrHost, "writing the bundle: %w", err)
	}
	if wantsCg {
		if err := b.cg.Create(p.runscID, cgroups.Limits{MemoryBytes: s.Resources.MemoryBytes, CPUMillis: s.Resources.CPUMillis}); err != nil {
			return fail(cellos.ErrHost, "cgroups: %w", err)
		}
		c.memory = b.cg.MemoryDir(p.runscID)
		cgPath := cgroups.Path(p.runscID)
		c.handle.CgroupPath = &cgPath
	}
	if err := b.makeControlNetns(c, dir); err != nil {
		return fail(cellos.ErrHost, "%w", err)
	}
	if c.net != nil {
		if err := b.setupNetwork(ctx, c); err != nil {
			return err
		}
	}
	flags := runsc.CellFlags{Log: filepath.Join(p.bundle, bundle.RunscLog), IgnoreCgroups: !wantsCg, Overlay: "none", Network: c.net.runscNetwork()}
	if s.Rootfs != nil && s.Rootfs.Writable {
		flags.Overlay = "root:memory"
	}
	if c.runsc.NoOverlay2 {
		flags.Overlay = "" // writable roots were refused (useRuntime)
	}
	cfg := shim.Config{CellID: s.ID, RunscID: p.runscID, Runsc: *c.runsc, Flags: flags,
		TTLSeconds: s.TTLSeconds(), OutputCap: b.opts.outputCap, MemoryCgroup: c.memory, RestoreImage: image}
	if err := b.startShim(ctx, c, dir, cfg); err != nil {
		return err
	}
	c.handle.CellID = s.ID
	b.startWatching(c)
	return nil
}

// makeControlNetns pins the cell's control network namespace in its bundle (see runsc.NetNS).
func (b *Backend) makeControlNetns(c *cell, dir *owned.Dir) error {
	if c.runsc.NetNS == "" {
		return nil
	}
	if err := dir.Verify(); err != nil {
		return err
	}
	if err := ctlns.Create(c.runsc.NetNS); err != nil {
		return fmt.Errorf("the cell's control network namespace: %w", err)
	}
	return nil
}

// writeBundle writes the marker, config.json, the root, the empty output files and the space
// of the exit record.
func (b *Backend) writeBundle(c *cell, dir *owned.Dir, doc *cellos.ExecutionCellDocument, wantsCg bool) error {
	s := &doc.Spec
	if err := bundle.WriteMarker(dir, s.ID); err != nil {
		return err
	}
	rootfs, err := dir.Mkdir(bundle.Rootfs, 0o755)
	if err != nil {
		return err
	}
	defer rootfs.Close()
	if s.Rootfs == nil {
		if err := bundle.WriteRootfs(rootfs, s, b.host); err != nil {
			return err
		}
	} else if s.Rootfs.Image != "" {
		if err := bundle.MountLayers(dir, c.layers); err != nil {
			return err
		}
	} else if err := bundle.MountImage(dir, s.Rootfs.Path); err != nil {
		return err
	}
	in := SpecInputs{HostSystem: b.host, NetNSPath: c.net.nsPath(), Sources: c.sources}
	if wantsCg {
		in.CgroupsPath = cgroups.Path(c.paths.runscID)
	}
	data, err := MarshalSpec(BuildSpec(doc, in))
	if err != nil {
		return err
	}
	if err := dir.WriteFile(bundle.Config, data, 0o644); err != nil {
		return err
	}
	return bundle.WriteFiles(dir)
}

// startShim hands the cell to a shim — the spare, or one started now — and waits until it has
// started runsc (or failed to).
func (b *Backend) startShim(ctx context.Context, c *cell, dir *owned.Dir, cfg shim.Config) error {
	id := c.id
	if err := bundle.WriteRecord(dir, bundle.ShimConfig, cfg); err != nil { // for operators; never read back
		return cellos.Errorf("create", id, cellos.ErrHost, "writing the shim record: %w", err)
	}
	if err := dir.Verify(); err != nil {
		return cellos.NewError("create", id, cellos.ErrHost, err)
	}
	dev, ino := dir.Ident()
	req := shim.Request{Protocol: shim.Protocol, Bundle: dir.Path(), Dev: dev, Ino: ino, Config: cfg}
	for {
		s, spare, err := b.shimProcess()
		if err != nil {
			return cellos.Errorf("create", id, cellos.ErrHost, "starting the shim: %w", err)
		}
		c.shim, c.pid = s, s.Ident
		err = s.Send(req)
		_ = s.Requests.Close()
		if err != nil {
			_ = s.Answers.Close()
			<-s.Exited
			c.shim, c.pid = nil, pidRecord{}
			if spare {
				continue // it was gone (killed from outside) before it read anything
			}
			return cellos.Errorf("create", id, cellos.ErrHost, "the shim exited before it read its request: %w", err)
		}
		msg, err := s.Answer(ctx, 0)
		_ = s.Answers.Close()
		if errors.Is(err, shim.ErrNoAnswer) {
			msg, err = "", nil
		}
		if err != nil {
			return cellos.NewError("create", id, cellos.ErrHost, fmt.Errorf("waiting for runsc to start: %w", err))
		}
		switch {
		case msg == "ok":
		case strings.HasPrefix(msg, "error: "):
			return cellos.Errorf("create", id, cellos.ErrHost, "%s", strings.TrimPrefix(msg, "error: "))
		case spare && !startedRunsc(dir):
			// The spare died (killed from outside) before it did anything for the cell: the
			// request went into its pipe as it was dying.
			<-s.Exited
			c.shim, c.pid = nil, pidRecord{}
			continue
		default:
			return cellos.Errorf("create", id, cellos.ErrHost, "the shim exited before starting runsc: %s", bundle.Tail(dir, bundle.ShimLog))
		}
		time.AfterFunc(spareDelay, b.refillSpare) // unless the cell exits sooner (watch)
		return nil
	}
}

// startedRunsc tells whether a shim got as far as starting runsc for the bundle: it writes
// shim.pid just before. Only a hint for retrying with another shim, never an instruction.
func startedRunsc(dir *owned.Dir) bool {
	_, err := dir.Lstat(bundle.ShimPid)
	return err == nil
}

// shimProcess returns the spare shim, or a shim started now; spare tells which.
func (b *Backend) shimProcess() (s *shim.Proc, spare bool, err error) {
	if s := b.spares.Take(); s != nil {
		return s, true, nil
	}
	s, err = shim.Start(shim.Argv0)
	return s, false, err
}

// startWatching follows the output (WithOutput) and waits for the shim in the background.
func (b *Backend) startWatching(c *cell) {
	if b.opts.output != nil {
		stdout, stderr := b.opts.output(c.id)
		f, err := follow.Start([]follow.Stream{
			{Path: filepath.Join(c.paths.bundle, bundle.Stdout), To: stdout},
			{Path: filepath.Join(c.paths.bundle, bundle.Stderr), To: stderr},
		})
		if err != nil {
			b.log.Warn("cannot follow the cell's output", zap.String("cell", c.id), zap.Error(err))
		}
		c.follower = f
	}
	go b.watch(c)
}

// watch waits for the shim to exit and publishes the cell's exit status.
func (b *Backend) watch(c *cell) {
	b.awaitShim(context.Background(), c)
	status, err := b.readExit(c)
	if c.follower != nil {
		c.follower.Stop()
	}
	if b.cells.isDestroying(c) && c.killSent.Load() && (err != nil || status.Signal == int(syscall.SIGKILL)) {
		// Destroy's kill ended it. A cell that exited on its own first keeps its exit.
		status, err = destroyedStatus, nil
	}
	c.status, c.waitErr = status, err
	go b.refillSpare() // the CPU its start-up takes is not the start of a cell now (spare.go)
	b.log.Info("cell exited", zap.String("cell", c.id), zap.Int("code", status.Code),
		zap.String("reason", string(status.Reason)), zap.Error(err))
	close(c.exited)
}

// destroyedStatus is what waiters on a destroyed cell get: it was killed by SIGKILL.
var destroyedStatus = cellos.ExitStatus{Code: 128 + int(syscall.SIGKILL), Signal: int(syscall.SIGKILL), Reason: cellos.ExitDestroyed}

// awaitShim blocks until the cell's shim has exited (and reaps it when it is our child).
func (b *Backend) awaitShim(ctx context.Context, c *cell) error {
	if h, err := shim.Open(c.pid, c.dir); err == nil {
		err = h.Wait(ctx)
		_ = h.Close()
		if err != nil {
			return err
		}
	}
	if c.shim != nil {
		<-c.shim.Exited
	}
	return nil
}

// readExit reads the exit record the shim left.
func (b *Backend) readExit(c *cell) (cellos.ExitStatus, error) {
	var rec shim.ExitRecord
	if err := bundle.ReadRecord(c.dir, bundle.Exit, &rec); err != nil {
		return cellos.ExitStatus{}, cellos.Errorf("wait", c.id, cellos.ErrHost,
			"the cell's shim ended without recording an exit status (%v); shim log: %s", err, bundle.Tail(c.dir, bundle.ShimLog))
	}
	for name, st := range map[string]shim.StreamRecord{"stdout": rec.Stdout, "stderr": rec.Stderr} {
		if st.Truncated {
			b.log.Warn("cell output reached its cap and was truncated", zap.String("cell", c.id),
				zap.String("stream", name), zap.Int64("kept", st.Bytes), zap.Int64("dropped", st.Dropped))
		}
		if st.Error != "" {
			b.log.Error("writing cell output failed", zap.String("cell", c.id), zap.String("stream", name), zap.String("error", st.Error))
		}
	}
	if rec.Error != "" {
		return cellos.ExitStatus{}, cellos.Errorf("wait", c.id, cellos.ErrHost, "runsc failed (%s): %s", rec.Runsc, rec.Error)
	}
	if rec.Checkpoint != "" {
		return cellos.ExitStatus{}, cellos.Errorf("wait", c.id, cellos.ErrHost, "%w to %s; Restore runs it on", ErrCheckpointed, rec.Checkpoint)
	}
	return rec.Status, nil
}

// WaitForExit blocks until the cell has exited or ctx is done, and returns how it ended. Every
// caller gets the same status until Destroy. When runsc itself failed, the error wraps ErrHost
// and carries runsc's message. When ctx ends the wait, the error wraps ctx.Err() (and ErrHost,
// the kind every error needs); the cell goes on.
func (b *Backend) WaitForExit(ctx context.Context, cellID string) (cellos.ExitStatus, error) {
	const op = "wait"
	if err := cellos.CheckID(op, cellID); err != nil {
		return cellos.ExitStatus{}, err
	}
	c := b.cells.get(cellID)
	if c == nil {
		return cellos.ExitStatus{}, cellos.Errorf(op, cellID, cellos.ErrNotTracked, "no such cell in this backend")
	}
	select {
	case <-c.ready:
	case <-ctx.Done():
		return cellos.ExitStatus{}, cellos.NewError(op, cellID, cellos.ErrHost, ctx.Err())
	}
	if !c.created {
		return cellos.ExitStatus{}, cellos.Errorf(op, cellID, cellos.ErrNotTracked, "no such cell in this backend")
	}
	select {
	case <-c.exited:
		if c.waitErr != nil {
			return cellos.ExitStatus{}, c.waitErr
		}
		return c.status, nil
	case <-ctx.Done():
		return cellos.ExitStatus{}, cellos.NewError(op, cellID, cellos.ErrHost, ctx.Err())
	}
}

// Destroy kills the cell if it runs and removes everything of it: the shim and runsc (SIGKILL),
// runsc's state, the cell's cgroups and its bundle directory. It works on cells this Backend does
// not track (runsc's state and the bundle root are the truth) and is idempotent. Report.Destroyed
// is true only when nothing of the cell is left. Destroy finishes its teardown even when ctx is
// cancelled (every step has its own bound); ctx bounds only waiting for another Destroy of the
// same cell.
func (b *Backend) Destroy(ctx context.Context, h cellos.CellHandle) (cellos.TeardownReport, error) {
	const op = "destroy"
	id := h.CellID
	if err := cellos.CheckID(op, id); err != nil {
		return cellos.TeardownReport{CellID: id}, err
	}
	placeholder := b.newCell(id, b.locate())
	close(placeholder.ready)
	c := b.cells.claim(placeholder)
	if c == nil {
		c = placeholder
	}
	done, first := b.cells.beginTeardown(c)
	if !first {
		select {
		case <-done:
			return c.report, c.destroyErr
		case <-ctx.Done():
			return cellos.TeardownReport{CellID: id, PeersTrackedAfter: b.cells.count()},
				cellos.NewError(op, id, cellos.ErrHost, fmt.Errorf("waiting for a concurrent destroy: %w", ctx.Err()))
		}
	}
	return b.destroyClaimed(c, done)
}

// destroyClaimed tears down c, whose teardown the caller began, and publishes the report.
func (b *Backend) destroyClaimed(c *cell, done chan struct{}) (cellos.TeardownReport, error) {
	<-c.ready
	start := time.Now()
	err := b.teardown(c)
	report := cellos.TeardownReport{CellID: c.id, Destroyed: err == nil, PeersTrackedAfter: b.cells.release(c)}
	if err != nil {
		err = cellos.NewError("destroy", c.id, cellos.ErrHost, err)
	}
	c.report, c.destroyErr = report, err
	if c.dir != nil && report.Destroyed {
		_ = c.dir.Close() // an operation still under way on it fails; it never reaches another file
	}
	close(done)
	b.log.Info("cell destroyed", zap.String("cell", c.id), zap.Bool("destroyed", report.Destroyed),
		zap.Duration("took", time.Since(start)), zap.Error(err))
	return report, err
}

// teardown removes everything of c and checks that nothing is left. Errors list what remains.
func (b *Backend) teardown(c *cell) error {
	p := c.paths
	var errs []error
	root, err := openExistingRoot(location{root: p.root, runsc: c.runsc})
	if err != nil {
		return err // nothing is touched in a root that is not the library's
	}
	if root != nil {
		defer root.Close()
	}
	dir := c.dir
	bundleIsDir := false
	if root != nil {
		if st, err := root.Lstat(c.id); err == nil {
			bundleIsDir = st.Mode&unix.S_IFMT == unix.S_IFDIR
		}
	}
	pid := c.pid
	if !c.created && !bundleIsDir {
		c.runsc.NetNS = "" // no bundle, no control namespace: runsc's state is reached from here
	}
	if !c.created && bundleIsDir {
		if dir == nil {
			if dir, err = b.openBundle(c, root); err != nil {
				return fmt.Errorf("bundle %s: %w", p.bundle, err)
			}
		}
		pid, _ = shim.Find(dir)
	}
	p = c.paths // openBundle may have found a warm-pool sandbox's runsc id
	h, _ := shim.Open(pid, dir)
	if h != nil {
		defer h.Close()
		// SIGKILL through runsc: `runsc run` then exits and removes its container itself, in
		// ~70 ms. A forced delete of a running container contends with runsc run's own cleanup
		// and takes seconds; it is the fallback.
		if err := b.stop(c, h, pid); err != nil {
			errs = append(errs, err)
		}
	}
	if c.created {
		select {
		case <-c.exited:
		case <-time.After(shimExitGrace):
			errs = append(errs, errors.New("the cell's watcher did not finish"))
		}
	}
	if h == nil && !c.runscFailed && len(c.runsc.StateFiles(p.runscID)) > 0 {
		b.stopOrphaned(c) // the shim was killed; runsc may live on (orphan.go)
	}
	if left := c.runsc.StateFiles(p.runscID); len(left) > 0 {
		// runsc run was killed before it could clean up, or the first delete raced its exit.
		if !c.runscFailed {
			if err := b.forceDelete(c); err != nil {
				errs = append(errs, err)
			}
		}
		if left := c.runsc.RemoveStaleLocks(p.runscID); len(left) > 0 {
			errs = append(errs, fmt.Errorf("runsc state left: %s", strings.Join(left, ", ")))
		}
	}
	b.releaseStateRoot(c.runsc) // current runsc's pinned null-netns, once no container is left
	if b.cg != nil {            // the cell's own: the path is its runsc id, unique to this bundle root
		if left, err := b.cg.Remove(p.runscID, cgroupRmTimout); err != nil {
			errs = append(errs, fmt.Errorf("cgroups left (%s): %w", strings.Join(left, ", "), err))
		}
	}
	if err := b.releaseNetwork(c, bundleIsDir); err != nil {
		errs = append(errs, err)
	}
	switch {
	case root == nil:
	case len(errs) > 0:
		// The bundle is the record that lets a later Destroy or Recover find what is left.
		errs = append(errs, fmt.Errorf("bundle %s kept until the rest is gone", p.bundle))
	default:
		if err := bundle.Remove(root, c.id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// stop ends a running cell: SIGKILL through runsc and a wait for the shim; failing that, a forced
// delete; failing that, SIGKILL to the shim and the processes below it.
func (b *Backend) stop(c *cell, h *proc.Handle, pid pidRecord) error {
	c.killSent.Store(true)
	if c.runsc.Path != "" {
		shim.ResumePaused(c.runsc, c.paths.runscID, c.dir) // a paused sandbox does not take SIGKILL
		// A cell created a moment ago may not have its container yet ("loading container: file
		// does not exist"): retry until the kill lands or the shim is gone.
		deadline := time.Now().Add(killGrace)
		for delay := 5 * time.Millisecond; time.Now().Before(deadline); delay = min(2*delay, 200*time.Millisecond) {
			ctx, cancel := context.WithDeadline(context.Background(), deadline)
			err := c.runsc.Kill(ctx, c.paths.runscID, "KILL")
			cancel()
			if err == nil {
				if waitFor(h, time.Until(deadline)) {
					return nil
				}
				break
			}
			if waitFor(h, delay) {
				return nil
			}
		}
	}
	var errs []error
	deleted := b.forceDelete(c)
	if errors.Is(deleted, context.DeadlineExceeded) || c.runsc.Path == "" {
		errs = append(errs, deleted)
		c.runscFailed = true // runsc hangs or is missing: do not wait on it again
	}
	// A delete runsc answered with an error (on a loaded host Debian's gives up stopping the
	// sandbox after its own deadline) is tried again by teardown once the shim is gone, and
	// reported only if that fails too.
	if deleted != nil || !waitFor(h, shimExitGrace) {
		if err := proc.KillTree(pid); err != nil && !errors.Is(err, os.ErrProcessDone) {
			errs = append(errs, fmt.Errorf("killing the shim (pid %d): %w", pid.Pid, err))
		}
		if !waitFor(h, shimExitGrace) {
			errs = append(errs, fmt.Errorf("the shim (pid %d) did not exit after SIGKILL", pid.Pid))
		}
	}
	return errors.Join(errs...)
}

// waitFor reports whether the process exits within d.
func waitFor(h *proc.Handle, d time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return h.Wait(ctx) == nil
}

func (b *Backend) forceDelete(c *cell) error {
	if c.runsc.Path == "" {
		return fmt.Errorf("cannot delete the runsc container: %w", b.locate().runscErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), runscTimeout)
	defer cancel()
	return c.runsc.Delete(ctx, c.paths.runscID)
}

// undoCreate removes what a failed Create made.
func (b *Backend) undoCreate(c *cell, root *owned.Dir, wantsCg bool) error {
	var errs []error
	if c.shim != nil {
		_ = proc.KillTree(c.pid)
		_ = c.shim.Cmd.Process.Kill() // through its pidfd
		<-c.shim.Exited
	}
	if len(c.runsc.StateFiles(c.paths.runscID)) > 0 {
		if err := b.forceDelete(c); err != nil {
			errs = append(errs, err)
		}
	}
	b.releaseStateRoot(c.runsc)
	if wantsCg && b.cg != nil {
		if _, err := b.cg.Remove(c.paths.runscID, cgroupRmTimout); err != nil {
			errs = append(errs, err)
		}
	}
	if c.net != nil && c.net.cell != nil { // a failed setup removed what it made, and nothing else
		if err := b.releaseNetwork(c, true); err != nil {
			errs = append(errs, err)
		}
	}
	if err := bundle.Remove(root, c.id); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// relabel returns err with its operation set to op, as a copy: the error may be shared.
func relabel(err error, op string) error {
	var e *cellos.Error
	if errors.As(err, &e) && e.Op != op {
		cp := *e
		cp.Op = op
		return &cp
	}
	return err
}

// Config returns the config.json that Create would write for doc, after the same checks, without
// touching the host.
func (b *Backend) Config(doc *cellos.ExecutionCellDocument) ([]byte, error) {
	const op = "config"
	if err := doc.Validate(); err != nil {
		return nil, relabel(err, op)
	}
	doc = b.withDefaults(doc)
	s := &doc.Spec
	if err := b.supports(s); err != nil {
		return nil, cellos.NewError(op, s.ID, cellos.ErrUnsupported, err)
	}
	if err := b.checkHost(s); err != nil {
		return nil, relabel(err, op)
	}
	loc := b.locate()
	sources, err := b.checkPolicy(s, loc)
	if err != nil {
		return nil, relabel(err, op)
	}
	if s.Rootfs != nil && s.Rootfs.Image != "" {
		img, err := b.useImage(context.Background(), op, doc, false) // never pulls
		if err != nil {
			return nil, err
		}
		img.release()
		doc, s = img.doc, &img.doc.Spec
		if sources, err = b.checkPolicy(s, loc); err != nil {
			return nil, relabel(err, op)
		}
	}
	in := SpecInputs{HostSystem: b.host, NetNSPath: egressNetNS(loc.root, s), Sources: sources}
	if s.WantsCgroups() {
		in.CgroupsPath = cgroups.Path(RunscID(loc.root, s.ID))
	}
	data, err := MarshalSpec(BuildSpec(doc, in))
	if err != nil {
		return nil, cellos.NewError(op, s.ID, cellos.ErrHost, err)
	}
	return data, nil
}
