package ctlns

// This file tells whether a runsc binary serves its control RPC on an abstract socket, for
// callers that cannot make namespaces (non-root) and must know whether the hole is there.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ControlSocket is the abstract name (without the leading NUL) on which runsc before about 2023
// serves the control RPC of the sandbox with container id id.
func ControlSocket(id string) string { return "runsc-sandbox." + id }

// ServesAbstractSocket tells whether a Unix socket bound to the abstract name ControlSocket(id)
// exists in the calling thread's network namespace, from /proc/thread-self/net/unix.
func ServesAbstractSocket(id string) (bool, error) {
	return hasAbstract(ControlSocket(id))
}

func hasAbstract(name string) (bool, error) {
	addrs, err := abstractAddrs(name)
	return len(addrs) > 0, err
}

// abstractAddrs returns the addresses, as /proc/net/unix shows them ("@" for each NUL), of the
// Unix sockets in the calling thread's network namespace bound to the abstract name, with or
// without a trailing NUL: runsc counts the NUL that ends the name in the address length, so its
// socket is "\x00runsc-sandbox.<id>\x00".
func abstractAddrs(name string) ([]string, error) {
	f, err := os.Open("/proc/thread-self/net/unix")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return scanAbstract(f, name)
}

// scanAbstract reads /proc/net/unix: "Num RefCount Protocol Flags Type St Inode [Path]", an
// abstract path shown with "@" for each NUL.
func scanAbstract(r io.Reader, name string) ([]string, error) {
	want := "@" + name
	var addrs []string
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 0, 4096), 1<<20)
	for first := true; s.Scan(); first = false {
		if first {
			continue // the header
		}
		f := strings.Fields(s.Text())
		if len(f) >= 8 && (f[7] == want || f[7] == want+"@") && !slices.Contains(addrs, f[7]) {
			addrs = append(addrs, f[7])
		}
	}
	return addrs, s.Err()
}

// ProbeAbstract finds out whether a runsc binary (run, which runs it) serves abstract control
// sockets that callers in this network namespace can reach, by experiment: it runs (run --detach) a
// sandbox of the OCI bundle at bundle under a fresh id and state root, with
// --rootless --network=none --ignore-cgroups and extra (e.g. --platform), looks for
// ControlSocket(id) in /proc/thread-self/net/unix, and force-deletes the sandbox. (runsc refuses
// "create" with --rootless, so the sandbox runs.) bundle must hold a config.json and rootfs
// readable by the caller whose process keeps running until killed (e.g. /bin/sleep 60): a
// sandbox that is gone before the probe looks gives an error, not an answer. It works as root
// and as an unprivileged user. Each call runs runsc (~0.2 s): cache the result per binary. run's
// output must not be a pipe (the sandbox would inherit it and hold it open).
func ProbeAbstract(ctx context.Context, run Runner, bundle string, extra ...string) (found bool, err error) {
	root, err := os.MkdirTemp("", "ctlns-probe-")
	if err != nil {
		return false, err
	}
	defer func() {
		if cerr := removeRoot(root); cerr != nil && err == nil {
			err = cerr
		}
	}()
	var rnd [12]byte
	_, _ = rand.Read(rnd[:])
	id := "ctlns-probe-" + hex.EncodeToString(rnd[:])

	// Global flags any user can run with.
	global := append([]string{"--root", root, "--rootless", "--network=none", "--ignore-cgroups"}, extra...)
	cmd := func(args ...string) []string { return append(slices.Clip(global), args...) }
	out, runErr := run(ctx, cmd("run", "--detach", "--bundle", bundle, id)...)
	// Whatever run did, leave no sandbox behind.
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		dout, derr := run(dctx, cmd("delete", "--force", id)...)
		if derr != nil && runErr == nil && err == nil {
			err = fmt.Errorf("deleting the probe sandbox: %w: %s", derr, dout)
		}
	}()
	if runErr != nil {
		return false, fmt.Errorf("probing runsc (runsc run): %w: %s", runErr, out)
	}
	if found, err := ServesAbstractSocket(id); found || err != nil {
		return found, err
	}
	// No abstract socket: an answer only if the sandbox was running when the probe looked.
	out, err = run(ctx, cmd("state", id)...)
	if err != nil {
		return false, fmt.Errorf("probing runsc (runsc state): %w: %s", err, out)
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return false, fmt.Errorf("probing runsc: reading runsc state: %w: %s", err, out)
	}
	if st.Status != "running" {
		return false, fmt.Errorf("probing runsc: the probe sandbox is %q, not running: its process must keep running", st.Status)
	}
	return false, nil
}

// Runner runs runsc with args and returns its output (combined, trimmed) and how it ended.
type Runner func(ctx context.Context, args ...string) (string, error)

// removeRoot removes a probe's state root. Some runsc versions leave a namespace bind mount
// there (null-netns): unmount what is mounted first.
func removeRoot(root string) error {
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		p := filepath.Join(root, e.Name())
		for i := 0; i < maxUnmounts; i++ {
			if err := unix.Unmount(p, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil {
				break
			}
		}
	}
	if err := os.RemoveAll(root); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the probe's state root: %w", err)
	}
	return nil
}
