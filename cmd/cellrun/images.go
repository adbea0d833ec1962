package main

// The verbs of the image store: pull, images, rmi, image-prune; and the pull that run does for a
// document whose root is an image the store lacks.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

const groupImages = "images (the image store, not the bundle root)"

// listFlag collects a repeatable string flag.
type listFlag struct{ vals []string }

func (l *listFlag) String() string   { return strings.Join(l.vals, ",") }
func (l *listFlag) repeatable() bool { return true }
func (l *listFlag) Set(v string) error {
	l.vals = append(l.vals, v)
	return nil
}

// interruptible is a context that SIGINT, SIGTERM and SIGHUP cancel.
func interruptible() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
}

func (c *cli) pullCommand() *command {
	cmd := newCommand("pull")
	cmd.group = groupImages
	cmd.summary = "fetch an image into the image store, verified, unpacked once"
	cmd.args = "REF"
	cmd.long = `
Pull fetches REF into the image store: REGISTRY/REPO:TAG, REGISTRY/REPO@sha256:DIGEST, or
oci-layout:DIR[:TAG] for an OCI image layout on disk. A tag is resolved again at every pull; the
layers the store has are not fetched again. Registries are reached over HTTPS, with the
credentials of the docker configuration (~/.docker/config.json, credential helpers); plain HTTP
only for those named by --insecure-registry. Every blob's digest is verified. On a terminal a
progress bar shows bytes and layers; otherwise one line per layer. Ctrl-C stops the pull and
keeps nothing of what was half done.`
	cmd.check = exactly(1)
	cmd.run = func(args []string) int {
		b, err := gvisor.New(c.g.options()...)
		if err != nil {
			return c.fail(err)
		}
		ctx, stop := interruptible()
		defer stop()
		info, err := c.pull(ctx, b, args[0])
		if err != nil {
			return c.fail(err)
		}
		fmt.Fprintf(c.stdout, "%s %s\n", info.Ref, info.Digest)
		return 0
	}
	return cmd
}

// pull pulls ref, reporting progress on stderr.
func (c *cli) pull(ctx context.Context, b *gvisor.Backend, ref string) (gvisor.ImageInfo, error) {
	rep := newPullReporter(c.stderr, ref)
	info, err := b.Pull(ctx, ref, gvisor.WithPullProgress(rep.report))
	rep.finish(err)
	return info, err
}

// pullMissing pulls the image of doc's root when the store lacks it, so that run shows the pull's
// progress (Create would pull it silently).
func (c *cli) pullMissing(b *gvisor.Backend, doc *cellos.ExecutionCellDocument) error {
	r := doc.Spec.Rootfs
	if r == nil || r.Image == "" {
		return nil
	}
	if _, err := b.Image(context.Background(), r.Image); err == nil {
		return nil
	}
	ctx, stop := interruptible()
	defer stop()
	_, err := c.pull(ctx, b, r.Image)
	return err
}

// pullReporter shows a pull: a progress bar on a terminal, plain lines otherwise.
type pullReporter struct {
	mu     sync.Mutex
	w      io.Writer
	ref    string
	bar    *progressbar.ProgressBar
	tty    bool
	done   map[int]bool
	total  int64
	layers int
	start  time.Time
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

func newPullReporter(w io.Writer, ref string) *pullReporter {
	return &pullReporter{w: w, ref: ref, tty: isTerminal(w), done: map[int]bool{}, start: time.Now()}
}

func (p *pullReporter) report(ev gvisor.PullProgress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ev.Total > 0 {
		p.total = ev.Total
	}
	if p.tty {
		p.reportBar(ev)
		return
	}
	switch {
	case ev.Layer == 0 && ev.Phase == "resolve" && ev.Layers > 0:
		fmt.Fprintf(p.w, "pull %s: %d layers, %s\n", p.ref, ev.Layers, size(ev.Total))
	case ev.Layer > 0 && ev.LayerDone && !p.done[ev.Layer]:
		p.done[ev.Layer] = true
		how := "fetched and unpacked"
		if ev.Cached {
			how = "already in the store"
		}
		fmt.Fprintf(p.w, "pull %s: layer %d/%d %s %s %s\n", p.ref, ev.Layer, ev.Layers, shortDigest(ev.Digest), size(ev.Size), how)
	}
}

func (p *pullReporter) reportBar(ev gvisor.PullProgress) {
	if p.bar == nil && ev.Layers > 0 && ev.Total > 0 {
		p.bar = progressbar.NewOptions64(ev.Total,
			progressbar.OptionSetWriter(p.w),
			progressbar.OptionShowBytes(true),
			progressbar.OptionShowCount(),
			progressbar.OptionUseIECUnits(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionShowElapsedTimeOnFinish(),
			progressbar.OptionSetDescription(p.describe(ev.Layers)),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(p.w) }),
		)
	}
	if p.bar == nil {
		return
	}
	if ev.Layer > 0 && ev.LayerDone {
		p.done[ev.Layer] = true
	}
	p.layers = ev.Layers
	p.bar.Describe(p.describe(ev.Layers))
	// The bar completes at finish, when the last layer is unpacked too, not at the last byte.
	_ = p.bar.Set64(min(ev.Done, p.total-1))
}

func (p *pullReporter) describe(layers int) string {
	return fmt.Sprintf("%s: layers %d/%d", p.ref, len(p.done), layers)
}

// finish ends the bar: complete on success, left where it stopped on failure.
func (p *pullReporter) finish(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar != nil {
		if err == nil {
			p.bar.Describe(p.describe(p.layers))
			_ = p.bar.Finish()
		} else {
			fmt.Fprintln(p.w)
		}
		return
	}
	if err == nil && !p.tty {
		fmt.Fprintf(p.w, "pull %s: done in %s\n", p.ref, time.Since(p.start).Round(time.Millisecond))
	}
}

func shortDigest(d string) string {
	d = strings.TrimPrefix(d, "sha256:")
	if len(d) > 12 {
		d = d[:12]
	}
	return d
}

// size is n bytes in IEC units.
func size(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func (c *cli) imagesCommand() *command {
	cmd := newCommand("images")
	cmd.group = groupImages
	cmd.summary = "list the images in the image store"
	cmd.long = `
Images lists the image store's images: reference, manifest digest, layers, unpacked size and
when it was pulled. --json prints them as a JSON array.`
	asJSON := cmd.flags.Bool("json", false, "print a JSON array")
	cmd.check = exactly(0)
	cmd.run = func([]string) int {
		b, err := gvisor.New(c.g.options()...)
		if err != nil {
			return c.fail(err)
		}
		imgs, err := b.Images(context.Background())
		if err != nil {
			return c.fail(err)
		}
		if *asJSON {
			if imgs == nil {
				imgs = []gvisor.ImageInfo{}
			}
			enc := json.NewEncoder(c.stdout)
			enc.SetIndent("", "  ")
			if err := enc.Encode(imgs); err != nil {
				return c.fail(err)
			}
			return 0
		}
		tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "REF\tDIGEST\tLAYERS\tSIZE\tPULLED")
		for _, i := range imgs {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", i.Ref, shortDigest(i.Digest), i.Layers, size(i.Size), i.Pulled.Format(time.RFC3339))
		}
		if err := tw.Flush(); err != nil {
			return c.fail(err)
		}
		return 0
	}
	return cmd
}

func (c *cli) rmiCommand() *command {
	cmd := newCommand("rmi")
	cmd.group = groupImages
	cmd.summary = "remove an image's name from the store"
	cmd.args = "REF..."
	cmd.long = `
Rmi removes each REF's name from the image store. Cells running from the image go on; its layers
stay until image-prune finds no name and no cell using them.`
	cmd.check = func(args []string) error {
		if len(args) == 0 {
			return fmt.Errorf("missing arguments: want at least 1, got 0")
		}
		return nil
	}
	cmd.run = func(args []string) int {
		b, err := gvisor.New(c.g.options()...)
		if err != nil {
			return c.fail(err)
		}
		code := 0
		for _, ref := range args {
			if err := b.RemoveImage(context.Background(), ref); err != nil {
				code = c.fail(err)
				continue
			}
			fmt.Fprintf(c.stdout, "removed %s\n", ref)
		}
		return code
	}
	return cmd
}

func (c *cli) imagePruneCommand() *command {
	cmd := newCommand("image-prune")
	cmd.group = groupImages
	cmd.summary = "delete the layers and blobs no image name or running cell uses"
	cmd.long = `
Image-prune deletes from the image store every layer and blob that no image name refers to,
except the layers of running cells (mounted as a cell's root, or held by a create under way).`
	cmd.check = exactly(0)
	cmd.run = func([]string) int {
		b, err := gvisor.New(c.g.options()...)
		if err != nil {
			return c.fail(err)
		}
		r, err := b.PruneImages(context.Background())
		if err != nil {
			return c.fail(err)
		}
		fmt.Fprintf(c.stdout, "deleted %d layers and %d blobs, %s; kept %d layers in use\n", r.Layers, r.Blobs, size(r.Bytes), r.InUse)
		return 0
	}
	return cmd
}
