// Package data owns the token datasets of training: the on-disk shard format
// (a fixed 64-byte header followed by little-endian uint16 or uint32 tokens),
// its streaming writer and validating reader, the Dataset that views an ordered
// list of shards as one token stream cut into pre-shifted training samples, the
// deterministic epoch sampler addressed by a global sample cursor, the
// data-parallel and sequence-parallel Loader, the byte-level tokenizer, and
// Prepare, which turns text files into shards.
//
// The package reads shards through io.ReaderAt so that object stores can be
// plugged in behind the Source interface; it does not talk to S3 itself and it
// must not depend on the model, kernels or collective packages.
//
// The format and the sampling rules are specified in docs/dataset-format.md;
// anything that changes the bytes of a shard or the order of samples must
// change that document and the format version.
package data
