package data

import (
	"bytes"
	"errors"
	"slices"
	"testing"
)

func TestByteTokenizerRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		text []byte
	}{
		{"empty", nil},
		{"ascii", []byte("hello, world\n")},
		{"utf8", []byte("Grüße, 世界 🌍")},
		{"all bytes", func() []byte {
			b := make([]byte, 256)
			for i := range b {
				b[i] = byte(i)
			}
			return b
		}()},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, tok := range []ByteTokenizer{{}, {EOD: true}} {
				ids := tok.Encode(nil, tc.text)
				if len(ids) != len(tc.text) {
					t.Fatalf("%d tokens for %d bytes", len(ids), len(tc.text))
				}
				for i, id := range ids {
					if id != int32(tc.text[i]) {
						t.Fatalf("token %d = %d, want byte value %d", i, id, tc.text[i])
					}
				}
				back, err := tok.Decode(ids)
				if err != nil || !bytes.Equal(back, tc.text) {
					t.Fatalf("Decode = %q, %v; want %q", back, err, tc.text)
				}
			}
		})
	}
}

func TestByteTokenizerDocuments(t *testing.T) {
	docs := [][]byte{[]byte("ab"), []byte(""), []byte("c")}
	eod := ByteTokenizer{EOD: true}
	if eod.VocabSize() != 257 || (ByteTokenizer{}).VocabSize() != 256 {
		t.Fatalf("vocab sizes %d, %d", eod.VocabSize(), ByteTokenizer{}.VocabSize())
	}
	ids := eod.EncodeDocuments([]int32{7}, docs...)
	if want := []int32{7, 'a', 'b', EODToken, EODToken, 'c'}; !slices.Equal(ids, want) {
		t.Fatalf("EncodeDocuments = %v, want %v", ids, want)
	}
	got, err := eod.DecodeDocuments(ids[1:])
	if err != nil || len(got) != 3 || string(got[0]) != "ab" || len(got[1]) != 0 || string(got[2]) != "c" {
		t.Fatalf("DecodeDocuments = %q, %v", got, err)
	}
	plain := ByteTokenizer{}
	if ids := plain.EncodeDocuments(nil, docs...); string(mustDecode(t, plain, ids)) != "abc" {
		t.Fatalf("without EOD documents are concatenated, got %v", ids)
	}
	for _, tc := range []struct {
		name string
		tok  ByteTokenizer
		ids  []int32
	}{
		{"EOD in Decode", eod, []int32{'a', EODToken}},
		{"EOD without EOD", plain, []int32{EODToken}},
		{"negative", eod, []int32{-1}},
		{"beyond vocab", eod, []int32{257}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			if tc.name == "EOD in Decode" {
				_, err = tc.tok.Decode(tc.ids)
			} else {
				_, err = tc.tok.DecodeDocuments(tc.ids)
			}
			if !errors.Is(err, ErrTokenRange) {
				t.Fatalf("error %v, want ErrTokenRange", err)
			}
		})
	}
}

func mustDecode(t *testing.T, tok ByteTokenizer, ids []int32) []byte {
	t.Helper()
	b, err := tok.Decode(ids)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
