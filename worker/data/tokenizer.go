package data

import (
	"fmt"
	"slices"
)

// Byte tokenizer constants.
const (
	// ByteVocab is the vocabulary size of the byte tokenizer without the
	// end-of-document token: one token per byte value.
	ByteVocab = 256
	// EODToken is the end-of-document token of the byte tokenizer. It is
	// inserted between documents when enabled, making the vocabulary 257.
	EODToken = 256
)

// ByteTokenizer maps each byte to the token of the same value (0..255).
// With EOD set, EODToken separates documents and the vocabulary is 257; the
// model pads its embedding to a multiple of its own choosing.
type ByteTokenizer struct {
	// EOD enables the end-of-document token.
	EOD bool
}

// VocabSize returns 256, or 257 with EOD.
func (t ByteTokenizer) VocabSize() uint32 {
	if t.EOD {
		return ByteVocab + 1
	}
	return ByteVocab
}

// Encode appends the tokens of text to dst and returns the extended slice.
// It never inserts EODToken; use EncodeDocuments for that.
func (t ByteTokenizer) Encode(dst []int32, text []byte) []int32 {
	dst = slices.Grow(dst, len(text))
	for _, c := range text {
		dst = append(dst, int32(c))
	}
	return dst
}

// EncodeDocuments appends the tokens of docs to dst, with EODToken between
// consecutive documents when EOD is set (none before the first or after the
// last), and returns the extended slice.
func (t ByteTokenizer) EncodeDocuments(dst []int32, docs ...[]byte) []int32 {
	for i, d := range docs {
		if i > 0 && t.EOD {
			dst = append(dst, EODToken)
		}
		dst = t.Encode(dst, d)
	}
	return dst
}

// Decode returns the bytes of tokens. It is the inverse of Encode: every
// token must be a byte value; EODToken or anything else fails with
// ErrTokenRange. Use DecodeDocuments for streams with EODToken.
func (t ByteTokenizer) Decode(tokens []int32) ([]byte, error) {
	out := make([]byte, len(tokens))
	for i, tok := range tokens {
		if tok < 0 || tok >= ByteVocab {
			return nil, fmt.Errorf("%w: token %d at index %d is not a byte", ErrTokenRange, tok, i)
		}
		out[i] = byte(tok)
	}
	return out, nil
}

// DecodeDocuments splits tokens at EODToken (allowed only when EOD is set) and
// returns the bytes of each document; n separators give n+1 documents. It is
// the inverse of EncodeDocuments.
func (t ByteTokenizer) DecodeDocuments(tokens []int32) ([][]byte, error) {
	docs := [][]byte{{}}
	for i, tok := range tokens {
		switch {
		case tok >= 0 && tok < ByteVocab:
			docs[len(docs)-1] = append(docs[len(docs)-1], byte(tok))
		case tok == EODToken && t.EOD:
			docs = append(docs, []byte{})
		default:
			return nil, fmt.Errorf("%w: token %d at index %d, vocab_size %d", ErrTokenRange, tok, i, t.VocabSize())
		}
	}
	return docs, nil
}
