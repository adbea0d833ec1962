package bundle

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
)

// Files and directories of a bundle, relative to <bundle root>/<cell id>.
const (
	Marker       = "cellos.json"   // the first file of every bundle: what Recover takes for one
	Config       = "config.json"   // the OCI runtime config
	Rootfs       = "rootfs"        // the cell's root
	Overlay      = "overlay"       // tmpfs holding the upper and work directories of an image root
	Stdout       = "stdout.log"    // the cell's output, capped
	Stderr       = "stderr.log"    //
	RunscLog     = "runsc.log"     // runsc's own log (JSON, errors only)
	ShimConfig   = "shim.json"     // a copy of the shim's request, for operators: never read
	ShimPid      = "shim.pid"      // the shim's pid and start time, for operators: never read
	ShimLog      = "shim.log"      // the shim's own log
	Exit         = "exit.json"     // how the cell ended, written once by the shim
	ExitReserve  = "exit.json.tmp" // the exit record's space, reserved at Create
	ControlNetns = "control.netns" // the cell's control network namespace (runsc.Runsc.NetNS)
	Net          = "net.json"      // a cell with egress rules: its network, for display
	Checkpoint   = "checkpoint.json"
	Paused       = "paused"       // present while Pause holds the cell
	SandboxSpec  = "sandbox.json" // a pooled cell: the config its sandbox was started with
	SandboxLog   = "sandbox.log"  // runsc's log of a pool sandbox itself
	Process      = "process.json" // a pooled cell's workload, for runsc exec --process
	WorkloadPid  = "workload.pid" // the pooled workload's pid inside the sandbox
)

// ExitReserveSize is the space reserved for the exit record: it is overwritten in place, so that
// the record needs no new blocks on a filesystem that filled up meanwhile.
const ExitReserveSize = 16 << 10

// MaxRecord bounds what the library reads back of a record of the bundle.
const MaxRecord = 64 << 10

// marker is the content of Marker.
type marker struct {
	Protocol int    `json:"protocol"`
	CellID   string `json:"cellId"`
}

// MarkerProtocol is the version of the bundle layout a marker names.
const MarkerProtocol = 1

// WriteMarker writes the bundle's marker: the first thing Create writes.
func WriteMarker(dir *owned.Dir, cellID string) error {
	return WriteRecord(dir, Marker, marker{Protocol: MarkerProtocol, CellID: cellID})
}

// HasMarker reports whether dir carries the library's marker for the cell id.
func HasMarker(dir *owned.Dir, cellID string) bool {
	var m marker
	return ReadRecord(dir, Marker, &m) == nil && m.Protocol == MarkerProtocol && m.CellID == cellID
}

// WriteFiles makes the files every bundle has from the start: the empty logs and the exit
// record's reserved space (real blocks, not a hole).
func WriteFiles(dir *owned.Dir) error {
	for _, name := range []string{Stdout, Stderr, RunscLog, ShimLog} {
		if err := dir.WriteFile(name, nil, 0o640); err != nil {
			return err
		}
	}
	return dir.WriteFile(ExitReserve, make([]byte, ExitReserveSize), 0o644)
}

// WriteRecord writes a record of the bundle, atomically.
func WriteRecord(dir *owned.Dir, name string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return dir.WriteAtomic(name, append(data, '\n'), 0o644)
}

// ReadRecord reads a record of the bundle: a regular file of the library's (owned by its euid),
// bounded in size, decoded strictly.
func ReadRecord(dir *owned.Dir, name string, v any) error {
	data, err := dir.ReadFile(name, MaxRecord)
	if err != nil {
		return err
	}
	return decodeStrict(data, v, filepath.Join(dir.Path(), name))
}

// maxConfig bounds the config.json the library reads back (a document at its size limits).
const maxConfig = 8 << 20

// ReadConfig reads the bundle's config.json, which the library wrote: the cell's own process,
// never an instruction to the host.
func ReadConfig(dir *owned.Dir, v any) error {
	data, err := dir.ReadFile(Config, maxConfig)
	if err != nil {
		return err
	}
	return decodeStrict(data, v, filepath.Join(dir.Path(), Config))
}

func decodeStrict(data []byte, v any, path string) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// Tail returns the end of a small log file of the bundle, for error messages.
func Tail(dir *owned.Dir, name string) string {
	if dir == nil {
		return "(no bundle)"
	}
	f, err := dir.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		return "(unreadable: " + err.Error() + ")"
	}
	defer f.Close()
	const keep = 2000
	if fi, err := f.Stat(); err == nil && fi.Size() > keep {
		_, _ = f.Seek(fi.Size()-keep, io.SeekStart)
	}
	data, _ := io.ReadAll(io.LimitReader(f, keep))
	s := strings.TrimSpace(string(data))
	if s == "" {
		return "(empty)"
	}
	return s
}

// WriteRootfs fills the root of a cell without rootfs: the host's system symlinks and a minimal
// /etc. Everything else the cell sees is a mount.
func WriteRootfs(root *owned.Dir, s *cellos.CellSpec, host []HostEntry) error {
	if err := WriteHostLinks(root, host); err != nil {
		return err
	}
	etc, err := root.Mkdir("etc", 0o755)
	if err != nil {
		return err
	}
	defer etc.Close()
	files := EtcFiles(s)
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if err := etc.WriteFile(name, []byte(files[name]), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// WriteHostLinks recreates the host's system symlinks (Debian's /bin -> usr/bin) in root.
func WriteHostLinks(root *owned.Dir, host []HostEntry) error {
	for _, h := range host {
		if h.Symlink == "" {
			continue
		}
		parent, name := filepath.Split(strings.TrimPrefix(h.Path, "/"))
		d := root
		for _, comp := range strings.Split(strings.Trim(parent, "/"), "/") {
			if comp == "" {
				continue
			}
			next, err := d.OpenDir(comp)
			if errors.Is(err, fs.ErrNotExist) {
				next, err = d.Mkdir(comp, 0o755)
			}
			if d != root {
				_ = d.Close()
			}
			if err != nil {
				return err
			}
			d = next
		}
		err := d.Symlink(h.Symlink, name)
		if d != root {
			_ = d.Close()
		}
		if err != nil {
			return err
		}
	}
	return nil
}
