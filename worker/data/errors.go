package data

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error returned by this package that concerns a shard
// is a *ShardError wrapping one of these, so callers test with errors.Is.
var (
	// ErrBadMagic: the file does not start with the shard magic bytes.
	ErrBadMagic = errors.New("data: bad magic")
	// ErrUnsupportedVersion: the header's format version is not one this
	// package reads.
	ErrUnsupportedVersion = errors.New("data: unsupported format version")
	// ErrBadWidth: the token width is neither 2 nor 4 bytes.
	ErrBadWidth = errors.New("data: bad token width")
	// ErrBadHeader: a header field breaks a rule of the format (vocabulary
	// size, reserved bytes, header checksum).
	ErrBadHeader = errors.New("data: bad header")
	// ErrTruncated: the file is shorter than its header says.
	ErrTruncated = errors.New("data: truncated shard")
	// ErrTrailingData: the file is longer than its header says.
	ErrTrailingData = errors.New("data: trailing data after tokens")
	// ErrChecksum: the CRC-32C of the token bytes does not match the header.
	ErrChecksum = errors.New("data: checksum mismatch")
	// ErrTokenRange: a token is negative or not below the vocabulary size.
	ErrTokenRange = errors.New("data: token out of vocabulary range")
	// ErrOutOfRange: a read asked for tokens or samples beyond the end.
	ErrOutOfRange = errors.New("data: read out of range")
	// ErrClosed: the writer or reader was already closed.
	ErrClosed = errors.New("data: closed")
	// ErrInvalidArgument: a configuration or call argument breaks a rule;
	// the wrapping message names the field and the rule.
	ErrInvalidArgument = errors.New("data: invalid argument")
	// ErrNoShards: a dataset location holds no shards.
	ErrNoShards = errors.New("data: no shards")
	// ErrMismatch: shards of one dataset disagree (vocabulary size) or a
	// manifest disagrees with a shard header.
	ErrMismatch = errors.New("data: dataset mismatch")
	// ErrTooSmall: the dataset has fewer tokens than one sample needs.
	ErrTooSmall = errors.New("data: dataset too small")
	// ErrNoInput: Prepare found no usable input file.
	ErrNoInput = errors.New("data: no usable input")
	// ErrOutputExists: Prepare's output directory already holds a dataset.
	ErrOutputExists = errors.New("data: output already holds a dataset")
)

// ShardError reports a problem with one shard file: which file, which header
// field or region, and the underlying sentinel.
type ShardError struct {
	Path  string // file name or object key of the shard
	Field string // header field or region, e.g. "magic", "token_count", "tokens"
	Err   error  // the cause; one of the sentinels above, possibly wrapped
}

func (e *ShardError) Error() string {
	return fmt.Sprintf("shard %s: %s: %v", e.Path, e.Field, e.Err)
}

// Unwrap returns the cause.
func (e *ShardError) Unwrap() error { return e.Err }

func shardErr(path, field string, err error) error {
	return &ShardError{Path: path, Field: field, Err: err}
}

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidArgument}, args...)...)
}
