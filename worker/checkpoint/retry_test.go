package checkpoint

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
)

func TestRetryDelayIsFullJitterUnderTheCap(t *testing.T) {
	p := RetryPolicy{Attempts: 10, BaseDelay: 10 * time.Millisecond, MaxDelay: 80 * time.Millisecond}
	caps := []time.Duration{10, 20, 40, 80, 80, 80}
	for n, c := range caps {
		c *= time.Millisecond
		var top time.Duration
		for range 200 {
			d := p.delay(n + 1)
			if d < 0 || d > c {
				t.Fatalf("delay after failure %d is %v, outside [0, %v]", n+1, d, c)
			}
			top = max(top, d)
		}
		// 200 uniform draws all below half the cap: probability 2^-200.
		if top < c/2 {
			t.Errorf("delays after failure %d never reached half the cap %v (max %v): not full jitter", n+1, c, top)
		}
	}
}

func TestRetryStopsOnPermanentErrorsAttemptsAndContext(t *testing.T) {
	fast := RetryPolicy{Attempts: 3, BaseDelay: time.Microsecond, MaxDelay: time.Microsecond}
	transient := &net.OpError{Op: "dial", Err: errors.New("connection refused")}
	permanent := minio.ErrorResponse{Code: "AccessDenied", StatusCode: 403}

	calls := 0
	err := fast.do(context.Background(), func(context.Context) error { calls++; return permanent }, nil)
	if calls != 1 || !errors.Is(err, permanent) {
		t.Errorf("permanent error: %d calls, %v; want 1 call", calls, err)
	}

	calls = 0
	var notified []int
	err = fast.do(context.Background(), func(context.Context) error { calls++; return transient },
		func(attempt int, _ time.Duration, _ error) { notified = append(notified, attempt) })
	if calls != 3 || err == nil || len(notified) != 2 {
		t.Errorf("transient error: %d calls, %d notices, %v; want 3 calls and 2 notices", calls, len(notified), err)
	}

	calls = 0
	err = fast.do(context.Background(), func(context.Context) error {
		calls++
		if calls < 3 {
			return minio.ErrorResponse{Code: "SlowDown", StatusCode: 503}
		}
		return nil
	}, nil)
	if err != nil || calls != 3 {
		t.Errorf("SlowDown then success: %d calls, %v", calls, err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	slow := RetryPolicy{Attempts: 100, BaseDelay: time.Hour, MaxDelay: time.Hour}
	calls = 0
	err = slow.do(ctx, func(context.Context) error { calls++; cancel(); return transient }, nil)
	if !errors.Is(err, context.Canceled) || calls != 1 {
		t.Errorf("cancelled context: %d calls, %v; want 1 call and context.Canceled", calls, err)
	}
}

func TestRetryableClassification(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&net.OpError{Op: "read", Err: errors.New("connection reset by peer")}, true},
		{minio.ErrorResponse{Code: "SlowDown", StatusCode: 503}, true},
		{minio.ErrorResponse{Code: "InternalError", StatusCode: 500}, true},
		{minio.ErrorResponse{Code: "Whatever", StatusCode: 502}, true},
		{minio.ErrorResponse{Code: "NoSuchKey", StatusCode: 404}, false},
		{minio.ErrorResponse{Code: "SignatureDoesNotMatch", StatusCode: 403}, false},
		{context.Canceled, false},
		{context.DeadlineExceeded, false},
	} {
		if got := retryable(tc.err); got != tc.want {
			t.Errorf("retryable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
