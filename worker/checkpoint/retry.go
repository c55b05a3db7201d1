package checkpoint

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"
)

// RetryPolicy says how a failed storage request is retried: up to Attempts
// tries in all, waiting a uniformly random time between zero and
// min(MaxDelay, BaseDelay·2^(n-1)) after the n-th failure ("full
// jitter"), and never past the request's context.
type RetryPolicy struct {
	// Attempts is the number of tries, the first included (default 10).
	Attempts int
	// BaseDelay is the cap of the first wait (default 200ms).
	BaseDelay time.Duration
	// MaxDelay caps every wait (default 15s).
	MaxDelay time.Duration
}

// Defaults of RetryPolicy.
const (
	DefaultRetryAttempts  = 10
	DefaultRetryBaseDelay = 200 * time.Millisecond
	DefaultRetryMaxDelay  = 15 * time.Second
)

func (p RetryPolicy) validate() error {
	if p.Attempts < 0 || p.BaseDelay < 0 || p.MaxDelay < 0 {
		return fmt.Errorf("checkpoint: retry: attempts, base delay and max delay must not be negative, got %d, %v, %v", p.Attempts, p.BaseDelay, p.MaxDelay)
	}
	if p.MaxDelay != 0 && p.BaseDelay > p.MaxDelay {
		return fmt.Errorf("checkpoint: retry: base delay %v must not exceed max delay %v", p.BaseDelay, p.MaxDelay)
	}
	return nil
}

func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.Attempts == 0 {
		p.Attempts = DefaultRetryAttempts
	}
	if p.BaseDelay == 0 {
		p.BaseDelay = DefaultRetryBaseDelay
	}
	if p.MaxDelay == 0 {
		p.MaxDelay = max(DefaultRetryMaxDelay, p.BaseDelay)
	}
	return p
}

// delay returns the wait after the n-th failure (n >= 1).
func (p RetryPolicy) delay(n int) time.Duration {
	ceil := p.BaseDelay
	for i := 1; i < n && ceil < p.MaxDelay; i++ {
		ceil *= 2
	}
	ceil = min(ceil, p.MaxDelay)
	if ceil <= 0 {
		return 0
	}
	return rand.N(ceil + 1)
}

// do runs fn until it succeeds, fails with an error that retryable
// rejects, the attempts run out or ctx ends. notify, when not nil, hears
// of every failure that will be retried. The error of the last attempt is
// returned, or ctx's error when ctx ended first.
func (p RetryPolicy) do(ctx context.Context, fn func(context.Context) error, notify func(attempt int, delay time.Duration, err error)) error {
	p = p.withDefaults()
	for attempt := 1; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		err := fn(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		}
		if !retryable(err) || attempt >= p.Attempts {
			if attempt > 1 {
				return fmt.Errorf("after %d attempts: %w", attempt, err)
			}
			return err
		}
		d := p.delay(attempt)
		if notify != nil {
			notify(attempt, d, err)
		}
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-t.C:
		}
	}
}
