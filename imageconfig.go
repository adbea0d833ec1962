package gvisor

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/moby/sys/user"
	"golang.org/x/sys/unix"

	"github.com/cellos/cellos-host-gvisor/cellos"
)

// maxImageFile bounds /etc/passwd and /etc/group read from an image.
const maxImageFile = 1 << 20

// imageRun is the process of a cell whose root is an image: what the document's run gives, and
// for what it leaves out, the image's config (precedence: document, image, library defaults).
//   - argv: the document's, which replaces the image's Entrypoint and Cmd both (as a Kubernetes
//     container's command does); absent, Entrypoint followed by Cmd.
//   - env: the image's Env, each variable the document sets overriding the image's; HOME from the
//     user's /etc/passwd entry in the image when neither sets it.
//   - workingDir: the document's, else the image's WorkingDir, else "/".
//   - user: the document's; else the image's User ("uid", "name", "uid:gid", "name:group"),
//     resolved in the image's /etc/passwd and /etc/group as docker does; else 65534:65534, the
//     library's default (not root, docker's default). An image naming root is refused: only the
//     document can ask for root.
//
// layers are the image's unpacked layers, lowest first. Problems are field errors of the run.
func imageRun(r cellos.RunSpec, cfg v1.Config, layers []string, ref string) (cellos.RunSpec, error) {
	out := r
	if out.Argv == nil {
		out.Argv = append(append([]string(nil), cfg.Entrypoint...), cfg.Cmd...)
		if len(out.Argv) == 0 {
			return r, cellos.FieldError{Field: "spec.run.argv", Reason: fmt.Sprintf("is required: the image %s has neither Entrypoint nor Cmd", ref)}
		}
	}
	env := make(map[string]string, len(cfg.Env)+len(r.Env))
	for _, kv := range cfg.Env {
		k, v, _ := strings.Cut(kv, "=")
		env[k] = v
	}
	maps.Copy(env, r.Env)
	out.Env = env
	if out.WorkingDir == "" {
		out.WorkingDir = cfg.WorkingDir
	}
	var home string
	if r.User == nil {
		u, h, err := imageUser(cfg.User, layers, ref)
		if err != nil {
			return r, err
		}
		out.User, home = u, h
	} else if h, err := homeOf(int(r.User.UID), layers); err == nil {
		home = h
	}
	if _, ok := env["HOME"]; !ok && home != "" {
		env["HOME"] = home
	}
	return out, nil
}

// imageUser resolves the image's User.
func imageUser(spec string, layers []string, ref string) (*cellos.UserSpec, string, error) {
	if spec == "" {
		h, _ := homeOf(cellos.DefaultUID, layers)
		return &cellos.UserSpec{UID: cellos.DefaultUID, GID: cellos.DefaultGID}, h, nil
	}
	passwd, err := readImageFile(layers, "etc/passwd")
	if err != nil {
		return nil, "", cellos.FieldError{Field: "spec.run.user", Reason: fmt.Sprintf("the image %s: reading /etc/passwd: %v", ref, err)}
	}
	group, err := readImageFile(layers, "etc/group")
	if err != nil {
		return nil, "", cellos.FieldError{Field: "spec.run.user", Reason: fmt.Sprintf("the image %s: reading /etc/group: %v", ref, err)}
	}
	// A lone uid without an entry runs in group 0, as docker does; a name must have an entry.
	eu, err := user.GetExecUser(spec, &user.ExecUser{Home: "/"}, readerOrNil(passwd), readerOrNil(group))
	if err != nil {
		return nil, "", cellos.FieldError{Field: "spec.run.user", Reason: fmt.Sprintf("the image %s has User %q: %v", ref, spec, err)}
	}
	if eu.Uid < 0 || eu.Gid < 0 || eu.Uid >= 1<<32-1 || eu.Gid >= 1<<32-1 {
		return nil, "", cellos.FieldError{Field: "spec.run.user", Reason: fmt.Sprintf("the image %s has User %q, out of range", ref, spec)}
	}
	if eu.Uid == 0 {
		return nil, "", cellos.FieldError{Field: "spec.run.user", Reason: fmt.Sprintf(
			"the image %s runs as root (User %q): give spec.run.user to run it as root or as another user", ref, spec)}
	}
	return &cellos.UserSpec{UID: uint32(eu.Uid), GID: uint32(eu.Gid)}, eu.Home, nil
}

// homeOf is the home directory of uid in the image's /etc/passwd.
func homeOf(uid int, layers []string) (string, error) {
	passwd, err := readImageFile(layers, "etc/passwd")
	if err != nil || passwd == nil {
		return "", err
	}
	users, err := user.ParsePasswdFilter(bytes.NewReader(passwd), func(u user.User) bool { return u.Uid == uid })
	if err != nil || len(users) == 0 {
		return "", err
	}
	return users[0].Home, nil
}

func readerOrNil(b []byte) io.Reader {
	if b == nil {
		return nil
	}
	return bytes.NewReader(b)
}

// readImageFile reads name (relative, e.g. "etc/passwd") as the image's merged root shows it,
// from the layers (lowest first, in overlayfs's format), or returns nil when the image has no
// such file. The layers are searched from the top; a whiteout hides what is below, an opaque
// directory ends the search. A symbolic link on the way counts as no file: the image's own
// view of it is resolved inside the sandbox, never on the host.
func readImageFile(layers []string, name string) ([]byte, error) {
	parts := strings.Split(name, "/")
	for i := len(layers) - 1; i >= 0; i-- {
		data, found, stop, err := readLayerFile(layers[i], parts)
		if err != nil || found {
			return data, err
		}
		if stop {
			return nil, nil
		}
	}
	return nil, nil
}

// readLayerFile looks for parts in one layer: found with its content, or stop when the layer
// hides the path in the layers below (a whiteout, an opaque directory, or not a directory).
func readLayerFile(layer string, parts []string) (data []byte, found, stop bool, err error) {
	fd, err := unix.Open(layer, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, false, false, err
	}
	defer func() { unix.Close(fd) }() // fd moves down the path: close the last one, once
	opaque := false
	for i, p := range parts {
		var st unix.Stat_t
		err := unix.Fstatat(fd, p, &st, unix.AT_SYMLINK_NOFOLLOW)
		if errors.Is(err, unix.ENOENT) {
			return nil, false, opaque, nil
		}
		if err != nil {
			return nil, false, false, err
		}
		last := i == len(parts)-1
		switch {
		case st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0: // a whiteout
			return nil, false, true, nil
		case last && st.Mode&unix.S_IFMT == unix.S_IFREG:
			data, err := readBounded(fd, p, filepath.Join(append([]string{layer}, parts...)...))
			return data, err == nil, false, err
		case st.Mode&unix.S_IFMT != unix.S_IFDIR: // a symlink, or a file where a directory is due
			return nil, false, true, nil
		case last:
			return nil, false, true, nil
		}
		next, err := unix.Openat(fd, p, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, false, false, err
		}
		unix.Close(fd)
		fd = next
		// An O_PATH descriptor has no xattrs: read them by its /proc name, which is this directory.
		var val [1]byte
		if n, err := unix.Getxattr(fmt.Sprintf("/proc/self/fd/%d", fd), "trusted.overlay.opaque", val[:]); err == nil && n == 1 && val[0] == 'y' {
			opaque = true
		} else if err != nil && !errors.Is(err, unix.ENODATA) && !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ERANGE) {
			return nil, false, false, err
		}
	}
	return nil, false, opaque, nil
}

func readBounded(dirfd int, name, path string) ([]byte, error) {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxImageFile+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxImageFile {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, maxImageFile)
	}
	return data, nil
}
