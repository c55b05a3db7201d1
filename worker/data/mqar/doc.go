// Package mqar owns the built-in multi-query associative recall task (MQAR,
// from the Zoology work of Arora, Eyuboglu et al., which the Mamba-2 paper
// uses to show that a larger state recalls more): the generator of its
// sequences, a loader that serves them to a training loop under the same
// contract as worker/data's Loader (a global sample cursor, per-rank slices
// of each step), and the scoring of a model's answers.
//
// A sequence lists key-value pairs, then repeats some of the keys at
// positions further on; a model must answer each repeated key with its value.
// Only the answers carry targets, every other target is -1 (not counted in
// the loss). Nothing is stored: sample i of a stream is a function of the
// seed, the stream and i alone, so any rank generates any sample. The exact
// construction, bit for bit, is in docs/mqar.md; changing the bytes of a
// sample must change that document.
//
// Like worker/data, the package must not depend on the model, kernels or
// collective packages; scoring works on plain logits.
package mqar
