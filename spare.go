package gvisor

import (
	"time"

	"go.uber.org/zap"
)

// spareDelay is how long after a Create the next spare shim is started at the latest: starting it
// right after the Create would take CPU from that cell's sandbox while it boots (internal/shim).
const spareDelay = time.Second

// refillSpare starts a spare shim when there is none.
func (b *Backend) refillSpare() {
	if err := b.spares.Refill(); err != nil {
		b.log.Warn("cannot start a spare shim; cells start without one", zap.Error(err))
	}
}
