package shim

import (
	"bufio"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/cellos"
	"github.com/cellos/cellos-host-gvisor/internal/bundle"
	"github.com/cellos/cellos-host-gvisor/internal/owned"
	"github.com/cellos/cellos-host-gvisor/internal/runsc"
)

func bufioReader(s string) *bufio.Reader { return bufio.NewReader(strings.NewReader(s)) }

var errEOF = io.EOF

// ownedDir opens (making it) a directory of the library's for a test.
func ownedDir(t testing.TB, path string) *owned.Dir {
	t.Helper()
	d, err := owned.Ensure(path, 0o700)
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// The exit record is written into space reserved at Create: on a filesystem that has filled up
// meanwhile it is recorded all the same.
func TestExitRecordOnFullFilesystem(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	require.NoError(t, unix.Mount("tmpfs", dir, "tmpfs", 0, "size=256k,mode=0700"))
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	d := ownedDir(t, dir)
	require.NoError(t, bundle.WriteFiles(d))
	filler, err := os.Create(filepath.Join(dir, "filler"))
	require.NoError(t, err)
	_, err = filler.Write(make([]byte, 1<<20))
	require.ErrorIs(t, err, unix.ENOSPC, "the filesystem is full")
	require.NoError(t, filler.Close())
	require.ErrorIs(t, d.WriteFile("other", []byte("x"), 0o644), unix.ENOSPC)

	reserve, err := d.OpenFile(bundle.ExitReserve, os.O_RDWR, 0)
	require.NoError(t, err)
	defer reserve.Close()
	rec := &ExitRecord{Status: cellos.ExitStatus{Code: 0, Reason: cellos.ExitExited}, Runsc: "exit 0", Error: strings.Repeat("e", 100)}
	require.NoError(t, writeExit(d, reserve, rec))
	var got ExitRecord
	require.NoError(t, bundle.ReadRecord(d, bundle.Exit, &got))
	assert.Equal(t, rec.Status, got.Status)
	assert.Equal(t, rec.Error, got.Error)
	_, err = os.Stat(filepath.Join(dir, bundle.ExitReserve))
	assert.ErrorIs(t, err, os.ErrNotExist, "the reserved space became the record")
}

// The shim refuses a request it cannot trust: another protocol, a relative bundle, unknown
// fields, an incomplete configuration; and it opens only the bundle the request identifies.
func TestShimRequestChecks(t *testing.T) {
	good := Request{Protocol: Protocol, Bundle: "/b/c", Config: Config{RunscID: "cellos-x", OutputCap: 1, Runsc: runsc.Runsc{Path: "/usr/bin/runsc"}}}
	require.NoError(t, good.Check())
	for name, change := range map[string]func(r *Request){
		"protocol": func(r *Request) { r.Protocol = 2 },
		"relative": func(r *Request) { r.Bundle = "b/c" },
		"unclean":  func(r *Request) { r.Bundle = "/b/../etc" },
		"no runsc": func(r *Request) { r.Config.Runsc.Path = "runsc" },
		"no id":    func(r *Request) { r.Config.RunscID = "" },
	} {
		r := good
		change(&r)
		assert.Error(t, r.Check(), name)
	}
	data, err := json.Marshal(good)
	require.NoError(t, err)
	var r Request
	bad := strings.Replace(string(data), `"protocol"`, `"extra":1,"protocol"`, 1)
	assert.ErrorContains(t, readRequest(bufioReader(bad+"\n"), &r), "unknown field")
	assert.ErrorContains(t, readRequest(bufioReader(strings.Repeat("x", maxRequest+10)), &r), "longer than")
	assert.ErrorIs(t, readRequest(bufioReader(""), &r), errEOF)
}

func TestOperateShimArgv(t *testing.T) {
	cfg := Config{RunscID: "cellos-x", Runsc: runsc.Runsc{Path: "/usr/bin/runsc", Root: "/state", Rootless: true},
		Flags: runsc.CellFlags{Log: "/b/c/runsc.log", Overlay: "none"}}
	assert.Equal(t, strings.Fields("--root /state --log /b/c/runsc.log --log-format=json --rootless --network=none --overlay2=none run --bundle /b/c cellos-x"),
		cfg.runscArgs("/b/c"))
	cfg.RestoreImage = "/images/one"
	assert.Equal(t, strings.Fields("--root /state --log /b/c/runsc.log --log-format=json --rootless --network=none --overlay2=none restore --image-path /images/one --bundle /b/c cellos-x"),
		cfg.runscArgs("/b/c"))
}

// A pooled cell's runsc process is an exec of its workload into the pool sandbox.
func TestPooledArgv(t *testing.T) {
	cfg := Config{RunscID: "cellos-pool-x", Runsc: runsc.Runsc{Path: "/usr/bin/runsc", Root: "/state"}, Pool: true,
		Flags: runsc.CellFlags{Log: "/b/runsc.log", IgnoreCgroups: true, Overlay: "none"}}
	assert.Equal(t, strings.Fields("--root /state --log /b/runsc.log --log-format=json --network=none --ignore-cgroups --overlay2=none "+
		"exec --process /b/process.json --internal-pid-file /b/workload.pid cellos-pool-x"), cfg.runscArgs("/b"))
}
