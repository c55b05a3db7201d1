package etcdembed

import (
	"context"
	"log/slog"
	"slices"
	"sync/atomic"

	"go.uber.org/zap/zapcore"
)

// slogCore hands etcd's zap entries of level warn and above to a
// *slog.Logger, with component=etcd, until it is made quiet. A nil logger
// takes nothing.
type slogCore struct {
	l      *slog.Logger
	quiet  *atomic.Bool
	fields []zapcore.Field
}

func newSlogCore(l *slog.Logger) *slogCore {
	if l != nil {
		l = l.With("component", "etcd")
	}
	return &slogCore{l: l, quiet: new(atomic.Bool)}
}

// expected are warnings etcd gives at every start of a member as this
// package configures it; they say nothing an operator can act on.
var expected = map[string]bool{
	// Clients and peers of the coordinator use gRPC and HTTP on one port.
	"Running http and grpc server on single port. This is not recommended for production.": true,
	// etcd's authentication is off; mutual TLS admits clients.
	"simple token is not cryptographically signed": true,
}

// Enabled implements zapcore.LevelEnabler.
func (c *slogCore) Enabled(l zapcore.Level) bool {
	return c.l != nil && l >= zapcore.WarnLevel && !c.quiet.Load()
}

// With implements zapcore.Core.
func (c *slogCore) With(fs []zapcore.Field) zapcore.Core {
	return &slogCore{l: c.l, quiet: c.quiet, fields: append(slices.Clip(c.fields), fs...)}
}

// Check implements zapcore.Core.
func (c *slogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

// Write implements zapcore.Core.
func (c *slogCore) Write(e zapcore.Entry, fs []zapcore.Field) error {
	if expected[e.Message] {
		return nil
	}
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fs {
		f.AddTo(enc)
	}
	keys := make([]string, 0, len(enc.Fields))
	for k := range enc.Fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	attrs := make([]slog.Attr, 0, len(keys))
	for _, k := range keys {
		attrs = append(attrs, slog.Any(k, enc.Fields[k]))
	}
	level := slog.LevelWarn
	if e.Level > zapcore.WarnLevel {
		level = slog.LevelError
	}
	c.l.LogAttrs(context.Background(), level, e.Message, attrs...)
	return nil
}

// Sync implements zapcore.Core.
func (c *slogCore) Sync() error { return nil }
