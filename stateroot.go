package gvisor

import (
	"github.com/cellos/cellos-host-gvisor/internal/runsc"

	"go.uber.org/zap"
)

// releaseStateRoot runs releaseSharedState and logs what it could not do: the namespace is no
// cell's, so it never fails a teardown.
func (b *Backend) releaseStateRoot(r *runsc.Runsc) {
	if err := r.ReleaseSharedState(); err != nil {
		b.log.Warn("cleaning runsc's state root", zap.String("root", r.Root), zap.Error(err))
	}
}
