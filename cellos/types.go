package cellos

import "context"

// APIVersion and Kind are the only values a document may carry in its header.
const (
	APIVersion = "cellos.dev/v1"
	Kind       = "ExecutionCell"
)

// ExecutionCellDocument is what a supervisor hands a backend: one cell to run.
type ExecutionCellDocument struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Spec       CellSpec `json:"spec"`
}

// CellSpec describes the cell. Optional sections are pointers: nil means the backend's default.
type CellSpec struct {
	ID        string            `json:"id"`
	Run       RunSpec           `json:"run"`
	Rootfs    *RootfsSpec       `json:"rootfs,omitempty"`
	Mounts    []MountSpec       `json:"mounts,omitempty"`
	Resources *ResourceSpec     `json:"resources,omitempty"`
	Network   *NetworkSpec      `json:"network,omitempty"`
	Lifetime  *LifetimeSpec     `json:"lifetime,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
}

// RunSpec is the process a cell runs.
type RunSpec struct {
	Argv       []string          `json:"argv,omitempty"` // required, unless the root is an image (then its Entrypoint+Cmd)
	Env        map[string]string `json:"env,omitempty"`
	WorkingDir string            `json:"workingDir,omitempty"` // absolute; default "/"
	User       *UserSpec         `json:"user,omitempty"`       // default 65534:65534
}

// UserSpec is the numeric identity the process runs as.
type UserSpec struct {
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
}

// RootfsSpec selects the cell's root: a directory (Path) or an OCI image (Image), exactly one.
type RootfsSpec struct {
	Path string `json:"path,omitempty"`
	// Image is "REGISTRY/REPO:TAG", "REGISTRY/REPO@sha256:DIGEST" or "oci-layout:DIR[:TAG]". The
	// image's config supplies what run leaves out: env, workingDir, user, and argv (Entrypoint+Cmd).
	Image    string `json:"image,omitempty"`
	Writable bool   `json:"writable,omitempty"` // writes stay in memory, never reach Path or the image
}

// MountSpec is one extra mount: "bind" (Source required, read-only unless ReadOnly is false) or
// "tmpfs" (SizeBytes optional, writable unless ReadOnly is true).
type MountSpec struct {
	Type        string `json:"type"`
	Source      string `json:"source,omitempty"`
	Destination string `json:"destination"`
	ReadOnly    *bool  `json:"readOnly,omitempty"`
	SizeBytes   int64  `json:"sizeBytes,omitempty"`
}

// Mount types.
const (
	MountBind  = "bind"
	MountTmpfs = "tmpfs"
)

// IsReadOnly reports the effective read-only flag of the mount, defaults applied.
func (m MountSpec) IsReadOnly() bool {
	if m.ReadOnly != nil {
		return *m.ReadOnly
	}
	return m.Type == MountBind
}

// ResourceSpec declares limits. Zero means "no limit".
type ResourceSpec struct {
	MemoryBytes int64 `json:"memoryBytes,omitempty"`
	CPUMillis   int64 `json:"cpuMillis,omitempty"` // 1000 = one core
	Pids        int64 `json:"pids,omitempty"`
}

// NetworkSpec declares what the cell may reach. Absent or empty: loopback only.
type NetworkSpec struct {
	Egress []EgressRule `json:"egress"`
}

// EgressRule allows new connections to one CIDR and port.
type EgressRule struct {
	CIDR     string `json:"cidr"`
	Port     int    `json:"port"`
	Protocol string `json:"protocol"` // "tcp" or "udp"
}

// LifetimeSpec bounds how long a cell may run.
type LifetimeSpec struct {
	TTLSeconds int64 `json:"ttlSeconds,omitempty"`
}

// CellBackend runs cells. Implementations are safe for concurrent use.
type CellBackend interface {
	// Create validates doc, prepares and starts the cell, and returns once it is running.
	// ctx bounds Create only: cancelling it later does not affect the cell.
	Create(ctx context.Context, doc *ExecutionCellDocument) (CellHandle, error)
	// WaitForExit blocks until the cell exits or ctx is done; ctx ends the wait, not the cell.
	WaitForExit(ctx context.Context, cellID string) (ExitStatus, error)
	// Destroy kills the cell if it runs and removes everything of it. It is idempotent.
	Destroy(ctx context.Context, h CellHandle) (TeardownReport, error)
}

// CellHandle identifies a created cell and what the backend set up for it.
type CellHandle struct {
	CellID                  string  `json:"cellId"`
	CgroupPath              *string `json:"cgroupPath"`
	NftRulesApplied         *bool   `json:"nftRulesApplied"`
	KernelDigestSHA256      *string `json:"kernelDigestSha256"`
	RootfsDigestSHA256      *string `json:"rootfsDigestSha256"`
	FirecrackerDigestSHA256 *string `json:"firecrackerDigestSha256"`
}

// TeardownReport says what Destroy achieved.
type TeardownReport struct {
	CellID            string `json:"cellId"`
	Destroyed         bool   `json:"destroyed"`         // nothing of the cell is left on the host
	PeersTrackedAfter int    `json:"peersTrackedAfter"` // cells the backend still tracks
}

// ExitStatus is how a cell ended.
type ExitStatus struct {
	Code   int        `json:"code"`             // the workload's exit code; 128+N for signal N
	Signal int        `json:"signal,omitempty"` // N when killed by signal N
	Reason ExitReason `json:"reason"`
}

// ExitReason classifies an exit.
type ExitReason string

// Exit reasons.
const (
	ExitExited           ExitReason = "exited"
	ExitSignaled         ExitReason = "signaled"
	ExitDeadlineExceeded ExitReason = "deadline-exceeded"
	ExitOOMKilled        ExitReason = "oom-killed"
	ExitDestroyed        ExitReason = "destroyed"
)
