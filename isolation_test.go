package gvisor_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	gvisor "github.com/cellos/cellos-host-gvisor"
	"github.com/cellos/cellos-host-gvisor/cellos"
)

// probe runs a shell script in a cell built from d and returns its stdout; the cell must exit 0.
func (e *realEnv) probe(d *cellos.ExecutionCellDocument) string {
	e.t.Helper()
	st, err := e.run(d)
	require.NoError(e.t, err)
	out := e.out(d.Spec.ID)
	require.Equal(e.t, cellos.ExitStatus{Reason: cellos.ExitExited}, st, "stdout: %s\nstderr: %s", out.stdout.String(), out.stderr.String())
	return out.stdout.String()
}

// lines parses "key=value" lines.
func lines(out string) map[string]string {
	m := map[string]string{}
	for l := range strings.Lines(out) {
		if k, v, ok := strings.Cut(strings.TrimSpace(l), "="); ok {
			m[k] = v
		}
	}
	return m
}

// isolationProbeScript prints, as key=value lines, what a cell sees of its isolation;
// marker is a host file it must not see. Pooled cells run it too (pool_test.go).
func isolationProbeScript(marker string) string {
	return `
caps=$(grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status | awk '{print $2}' | sort -u | tr '\n' ' ')
echo "caps=$caps"
echo "capsets=$(grep -cE '^Cap(Inh|Prm|Eff|Bnd):' /proc/self/status)"
echo "ambient=$(python3 -c 'import ctypes; l = ctypes.CDLL(None); print(sum(l.prctl(47, 1, c, 0, 0) == 1 for c in range(41)))')"
echo "nnp=$(python3 -c 'import ctypes; print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))')"
echo "uid=$(id -u) gid=$(id -g) user=$(id -un)"
touch /rootwrite 2>/dev/null && echo "rootwrite=yes" || echo "rootwrite=no"
touch /usr/cellos-probe 2>/dev/null && echo "usrwrite=yes" || echo "usrwrite=no"
echo probe > /tmp/probe && echo "tmpwrite=$(cat /tmp/probe)"
echo "tmpfs=$(awk '$2 == "/tmp" {print $3}' /proc/mounts)"
test -e ` + marker + ` && echo "hostmarker=visible" || echo "hostmarker=hidden"
echo "ifaces=$(python3 -c 'import socket; print(",".join(n for _, n in socket.if_nameindex()))')"
echo "hostname=$(cat /proc/sys/kernel/hostname)"
echo "pid=$$"
echo "procs=$(cd /proc && echo [0-9]* | tr ' ' '\n' | wc -l)"
for p in /etc/debian_version /etc/shadow /root /home /var /work /srv /opt /boot; do test -e $p && echo "visible=$p"; done
echo "etc=$(cd /etc && echo *)"
echo "usr=$(test -x /usr/bin/python3 && echo ok)"
echo "awk=$(awk 'BEGIN{print 42}')"
echo "resolv=$(wc -c < /etc/resolv.conf)"
`
}

func TestIsolationDefaults(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	// A marker the cell must not see: the host's /tmp and /etc are not the cell's.
	marker, err := os.CreateTemp("/tmp", "cellos-host-marker-*")
	require.NoError(t, err)
	marker.Close()
	t.Cleanup(func() { os.Remove(marker.Name()) })
	out := e.probe(sh("defaults", isolationProbeScript(marker.Name())))
	got := lines(out)
	// Debian's gVisor has no CapAmb line; the ambient set is read with prctl(PR_CAP_AMBIENT).
	assert.Equal(t, "0000000000000000", got["caps"], "inheritable, permitted, effective, bounding sets empty")
	assert.Equal(t, "4", got["capsets"])
	assert.Equal(t, "0", got["ambient"], "ambient capabilities raised")
	assert.Equal(t, "1", got["nnp"], "no-new-privileges")
	assert.Contains(t, out, "uid=65534 gid=65534 user=nobody")
	assert.Equal(t, "no", got["rootwrite"], "root is read-only")
	assert.Equal(t, "no", got["usrwrite"], "host /usr is read-only")
	assert.Equal(t, "probe", got["tmpwrite"])
	assert.Equal(t, "tmpfs", got["tmpfs"])
	assert.Equal(t, "hidden", got["hostmarker"])
	assert.Equal(t, "lo", got["ifaces"], "loopback only")
	assert.Equal(t, "defaults", got["hostname"])
	assert.Equal(t, "1", got["pid"], "the workload is pid 1 of its own namespace")
	procs, _ := strconv.Atoi(got["procs"])
	assert.LessOrEqual(t, procs, 6, "only the cell's processes are visible:\n%s", out)
	assert.NotContains(t, out, "visible=", "host paths visible")
	assert.Equal(t, "alternatives group hostname hosts ld.so.cache passwd resolv.conf", got["etc"])
	assert.Equal(t, "ok", got["usr"])
	assert.Equal(t, "42", got["awk"], "/etc/alternatives resolves")
	assert.Equal(t, "0", got["resolv"])
}

func TestIsolationTmpIsPrivate(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	e.probe(sh("tmp-a", "echo secret > /tmp/shared && cat /tmp/shared"))
	out := e.probe(sh("tmp-b", "cat /tmp/shared 2>/dev/null || echo absent"))
	assert.Equal(t, "absent\n", out)
}

func TestIsolationNoHostLoopback(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan struct{}, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
			accepted <- struct{}{}
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	out := e.probe(doc("noloop", "/usr/bin/python3", "-c", fmt.Sprintf(`
import socket
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", %d))
    print("connected")
except Exception as e:
    print("refused", type(e).__name__)
`, port)))
	assert.Contains(t, out, "refused")
	select {
	case <-accepted:
		t.Fatal("the host's loopback service accepted a connection from the cell")
	case <-time.After(100 * time.Millisecond):
	}
}

func TestIsolationUserAndWorkingDir(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	d := sh("user", `echo "$(id -u):$(id -g):$(id -un):$PWD:$GREETING:$PATH"`)
	d.Spec.Run.User = &cellos.UserSpec{UID: 1000, GID: 1000}
	d.Spec.Run.WorkingDir = "/tmp"
	d.Spec.Run.Env = map[string]string{"GREETING": "hi"}
	assert.Equal(t, "1000:1000:cell:/tmp:hi:"+cellos.DefaultPath+"\n", e.probe(d))
}

// busyboxImage builds a small image directory from Debian's busybox-static.
func busyboxImage(t *testing.T) string {
	t.Helper()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		if os.Getenv("CELLOS_REQUIRE_RUNSC") == "1" {
			t.Fatalf("busybox is required for image tests (apt-get install busybox-static): %v", err)
		}
		t.Skip("busybox not installed")
	}
	dir := filepath.Join(t.TempDir(), "image")
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "bin"), 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "etc"), 0o755))
	data, err := os.ReadFile(bb)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "bin", "busybox"), data, 0o755))
	for _, a := range []string{"sh", "cat", "echo", "touch", "ls", "id", "rm", "mkdir", "test", "dd", "wc"} {
		require.NoError(t, os.Symlink("busybox", filepath.Join(dir, "bin", a)))
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "etc", "motd"), []byte("from the image\n"), 0o644))
	return dir
}

// treeDigest describes a directory tree: every entry's path, type, mode, size, mtime, link
// target and content digest. Equal digests mean the tree was not modified.
func treeDigest(t *testing.T, root string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fmt.Fprintf(&b, "%s %v %d %d", rel, fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			b.WriteString(" -> " + target)
		case fi.Mode().IsRegular():
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(data)
			b.WriteString(" " + hex.EncodeToString(sum[:]))
		}
		b.WriteString("\n")
		return nil
	})
	require.NoError(t, err)
	return b.String()
}

func TestIsolationImageRootReadOnly(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t, gvisor.WithAllowRoot(true)) // root in the cell, to try writing to the image
	img := busyboxImage(t)
	before := treeDigest(t, img)
	d := sh("img-ro", `cat /etc/motd; touch /new 2>/dev/null && echo wrote || echo ro; echo t > /tmp/t && echo tmp-ok; test -e /usr && echo host-usr || echo no-host-usr`)
	d.Spec.Rootfs = &cellos.RootfsSpec{Path: img}
	d.Spec.Run.User = &cellos.UserSpec{UID: 0, GID: 0} // even root cannot write a read-only root
	d.Spec.Mounts = []cellos.MountSpec{{Type: cellos.MountTmpfs, Destination: "/scratch"}}
	assert.Equal(t, "from the image\nro\ntmp-ok\nno-host-usr\n", e.probe(d))
	assert.Equal(t, before, treeDigest(t, img), "the image directory changed")
}

func TestIsolationImageRootWritable(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t, gvisor.WithAllowRoot(true)) // root in the cell, to try writing to the image
	img := busyboxImage(t)
	before := treeDigest(t, img)
	d := sh("img-rw", `echo changed > /etc/motd && cat /etc/motd; touch /new && echo wrote; rm /bin/cat && echo removed`)
	d.Spec.Rootfs = &cellos.RootfsSpec{Path: img, Writable: true}
	d.Spec.Run.User = &cellos.UserSpec{UID: 0, GID: 0}
	assert.Equal(t, "changed\nwrote\nremoved\n", e.probe(d))
	assert.Equal(t, before, treeDigest(t, img), "writes reached the image directory")
	// A second cell on the same image sees the original.
	d2 := sh("img-rw2", `cat /etc/motd; test -e /new && echo new-visible || echo new-absent`)
	d2.Spec.Rootfs = &cellos.RootfsSpec{Path: img, Writable: true}
	assert.Equal(t, "from the image\nnew-absent\n", e.probe(d2))
	assert.Equal(t, before, treeDigest(t, img))
}

func TestIsolationBindMounts(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	ro, rw := t.TempDir(), t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(ro, "in"), []byte("host data\n"), 0o644))
	require.NoError(t, os.Chmod(rw, 0o777))
	d := sh("binds", `cat /ro/in; echo x > /ro/out 2>/dev/null && echo ro-written || echo ro-refused; echo from-cell > /rw/out && echo rw-written; dd if=/dev/zero of=/small/f bs=1024 count=2048 2>/dev/null && echo small-filled || echo small-full`)
	no := false
	d.Spec.Mounts = []cellos.MountSpec{
		{Type: cellos.MountBind, Source: ro, Destination: "/ro"},
		{Type: cellos.MountBind, Source: rw, Destination: "/rw", ReadOnly: &no},
		{Type: cellos.MountTmpfs, Destination: "/small", SizeBytes: 1 << 20},
	}
	assert.Equal(t, "host data\nro-refused\nrw-written\nsmall-full\n", e.probe(d))
	_, err := os.Stat(filepath.Join(ro, "out"))
	assert.ErrorIs(t, err, os.ErrNotExist)
	data, err := os.ReadFile(filepath.Join(rw, "out"))
	require.NoError(t, err)
	assert.Equal(t, "from-cell\n", string(data))
}

func TestIsolationMountErrors(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	cases := map[string]struct {
		m     cellos.MountSpec
		field string
	}{
		"missing source": {cellos.MountSpec{Type: cellos.MountBind, Source: "/nonexistent/cellos", Destination: "/d"}, "spec.mounts[0].source"},
		"relative dest":  {cellos.MountSpec{Type: cellos.MountTmpfs, Destination: "scratch"}, "spec.mounts[0].destination"},
		"unclean dest":   {cellos.MountSpec{Type: cellos.MountTmpfs, Destination: "/a/../proc"}, "spec.mounts[0].destination"},
		"shadows proc":   {cellos.MountSpec{Type: cellos.MountTmpfs, Destination: "/proc"}, "spec.mounts[0].destination"},
		"shadows root":   {cellos.MountSpec{Type: cellos.MountTmpfs, Destination: "/"}, "spec.mounts[0].destination"},
	}
	for name, c := range cases {
		d := sh("mnt-err", "true")
		d.Spec.Mounts = []cellos.MountSpec{c.m}
		_, err := e.b.Create(context.Background(), d)
		require.ErrorIs(t, err, cellos.ErrInvalidSpec, name)
		assert.Contains(t, cellos.Fields(err), c.field, name)
	}
	assert.Empty(t, e.leftovers())
}

func TestIsolationMemoryLimit(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	alloc := func(id string, mib int) (cellos.ExitStatus, string) {
		d := doc(id, "/usr/bin/python3", "-c", fmt.Sprintf(`
b = bytearray(%d << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
print("allocated")
`, mib))
		d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 256 << 20}
		st, err := e.run(d)
		require.NoError(t, err)
		return st, e.out(id).stdout.String()
	}
	st, out := alloc("mem-small", 32)
	assert.Equal(t, cellos.ExitStatus{Reason: cellos.ExitExited}, st)
	assert.Equal(t, "allocated\n", out)
	st, out = alloc("mem-big", 1024)
	assert.NotContains(t, out, "allocated")
	assert.Equal(t, cellos.ExitOOMKilled, st.Reason, "status %+v", st)
	assert.Equal(t, 137, st.Code)
}

// TestIsolationCPULimit is not parallel: it measures CPU shares, which the suite's other cells
// would distort on a 2-core machine.
func TestIsolationCPULimit(t *testing.T) {
	e := newRealEnv(t)
	// Share of one core a CPU-bound loop gets in 3 s of wall time, read from the cell's cpuacct
	// cgroup (which the library keeps until Destroy).
	share := func(id string, millis int64) float64 {
		d := doc(id, "/usr/bin/python3", "-c", `
import time
end = time.time() + 3
while time.time() < end:
    pass
`)
		d.Spec.Resources = &cellos.ResourceSpec{CPUMillis: millis}
		h := e.create(d)
		start := time.Now()
		st, err := e.b.WaitForExit(context.Background(), h.CellID)
		elapsed := time.Since(start)
		require.NoError(t, err)
		require.Equal(t, cellos.ExitExited, st.Reason)
		usage, err := os.ReadFile("/sys/fs/cgroup/cpuacct" + *h.CgroupPath + "/cpuacct.usage")
		if os.IsNotExist(err) {
			usage, err = os.ReadFile("/sys/fs/cgroup/cpu,cpuacct" + *h.CgroupPath + "/cpuacct.usage")
		}
		require.NoError(t, err)
		ns, err := strconv.ParseInt(strings.TrimSpace(string(usage)), 10, 64)
		require.NoError(t, err)
		return float64(ns) / float64(elapsed.Nanoseconds())
	}
	limited := share("cpu-quarter", 250)
	assert.Less(t, limited, 0.33, "a cell limited to 250 millicores used %.2f of a core", limited)
	assert.Greater(t, limited, 0.10, "the busy loop barely ran (%.2f of a core)", limited)
	full := share("cpu-full", 2000)
	assert.Greater(t, full, limited*2, "an unlimited loop should use far more CPU (%.2f vs %.2f)", full, limited)
}

func TestIsolationCgroupsRemoved(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	d := sh("cg-gone", "true")
	d.Spec.Resources = &cellos.ResourceSpec{MemoryBytes: 128 << 20, CPUMillis: 500}
	h := e.create(d)
	_, err := e.b.WaitForExit(context.Background(), h.CellID)
	require.NoError(t, err)
	assert.NotEmpty(t, e.cgroupDirs("cg-gone"), "the library keeps the cell's cgroups until Destroy")
	limit, err := os.ReadFile("/sys/fs/cgroup/memory" + *h.CgroupPath + "/memory.limit_in_bytes")
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(128<<20), strings.TrimSpace(string(limit)))
	quota, err := os.ReadFile("/sys/fs/cgroup/cpu" + *h.CgroupPath + "/cpu.cfs_quota_us")
	require.NoError(t, err)
	assert.Equal(t, "50000", strings.TrimSpace(string(quota)))
	e.destroy(h)
	assert.Empty(t, e.cgroupDirs("cg-gone"))
}

func TestIsolationRefusedLimits(t *testing.T) {
	t.Parallel()
	e := newRealEnv(t)
	d := sh("refused", "true")
	d.Spec.Resources = &cellos.ResourceSpec{Pids: 10}
	_, err := e.b.Create(context.Background(), d)
	require.ErrorIs(t, err, cellos.ErrUnsupported)
	assert.Contains(t, err.Error(), "spec.resources.pids")
	d = sh("refused", "true")
	d.Spec.Network = &cellos.NetworkSpec{Egress: []cellos.EgressRule{{CIDR: "2001:db8::/32", Port: 443, Protocol: "tcp"}}} // IPv4 only (network_test.go)
	_, err = e.b.Create(context.Background(), d)
	require.ErrorIs(t, err, cellos.ErrUnsupported)
	assert.Contains(t, err.Error(), "spec.network.egress[0].cidr")
	assert.Empty(t, e.leftovers())
}
