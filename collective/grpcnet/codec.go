package grpcnet

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// Field numbers of collectivev1.Chunk.
const (
	fieldGeneration = 1
	fieldOpID       = 2
	fieldSrcRank    = 3
	fieldSeq        = 4
	fieldPayload    = 5
)

// chunkOut is a Chunk to send; payload is the caller's memory, put on the
// wire without a copy.
type chunkOut struct {
	generation, opID uint64
	src, seq         uint32
	payload          []byte
}

// chunkIn receives a Chunk; the codec hands the payload to consume piece by
// piece, straight from gRPC's receive buffers.
type chunkIn struct {
	generation, opID uint64
	src, seq         uint32
	n                int
	consume          func(piece []byte)
}

// rawCodec encodes Chunk messages without copying or marshalling their
// payload, and every other message with the protobuf runtime. The bytes on
// the wire are ordinary protobuf, so it keeps the name of the standard codec
// and any gRPC client can talk to the service.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	switch m := v.(type) {
	case *chunkOut:
		hdr := make([]byte, 0, 48)
		hdr = appendVarintField(hdr, fieldGeneration, m.generation)
		hdr = appendVarintField(hdr, fieldOpID, m.opID)
		hdr = appendVarintField(hdr, fieldSrcRank, uint64(m.src))
		hdr = appendVarintField(hdr, fieldSeq, uint64(m.seq))
		if len(m.payload) == 0 {
			return mem.BufferSlice{mem.SliceBuffer(hdr)}, nil
		}
		hdr = protowire.AppendTag(hdr, fieldPayload, protowire.BytesType)
		hdr = protowire.AppendVarint(hdr, uint64(len(m.payload)))
		return mem.BufferSlice{mem.SliceBuffer(hdr), mem.SliceBuffer(m.payload)}, nil
	case proto.Message:
		b, err := proto.Marshal(m)
		if err != nil {
			return nil, err
		}
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	return nil, fmt.Errorf("grpcnet: cannot marshal %T", v)
}

func appendVarintField(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	switch m := v.(type) {
	case *chunkIn:
		return m.decode(data)
	case proto.Message:
		if len(data) == 1 {
			return proto.Unmarshal(data[0].ReadOnlyData(), m)
		}
		return proto.Unmarshal(data.Materialize(), m)
	}
	return fmt.Errorf("grpcnet: cannot unmarshal into %T", v)
}

var errBadChunk = errors.New("grpcnet: malformed chunk")

// pieces reads a message that gRPC holds in several buffers.
type pieces struct {
	bufs [][]byte
}

func (p *pieces) empty() bool {
	for len(p.bufs) > 0 && len(p.bufs[0]) == 0 {
		p.bufs = p.bufs[1:]
	}
	return len(p.bufs) == 0
}

func (p *pieces) byte() (byte, bool) {
	if p.empty() {
		return 0, false
	}
	b := p.bufs[0][0]
	p.bufs[0] = p.bufs[0][1:]
	return b, true
}

func (p *pieces) varint() (uint64, bool) {
	var v uint64
	for shift := uint(0); shift < 64; shift += 7 {
		b, ok := p.byte()
		if !ok {
			return 0, false
		}
		v |= uint64(b&0x7f) << shift
		if b < 0x80 {
			return v, true
		}
	}
	return 0, false
}

// take passes the next n bytes to fn (if not nil) in pieces.
func (p *pieces) take(n int, fn func([]byte)) bool {
	for n > 0 {
		if p.empty() {
			return false
		}
		k := min(n, len(p.bufs[0]))
		if fn != nil {
			fn(p.bufs[0][:k])
		}
		p.bufs[0] = p.bufs[0][k:]
		n -= k
	}
	return true
}

func (m *chunkIn) decode(data mem.BufferSlice) error {
	p := pieces{bufs: make([][]byte, 0, len(data))}
	for _, b := range data {
		p.bufs = append(p.bufs, b.ReadOnlyData())
	}
	m.generation, m.opID, m.src, m.seq, m.n = 0, 0, 0, 0, 0
	for !p.empty() {
		tag, ok := p.varint()
		if !ok {
			return errBadChunk
		}
		num, typ := protowire.DecodeTag(tag)
		switch typ {
		case protowire.VarintType:
			v, ok := p.varint()
			if !ok {
				return errBadChunk
			}
			switch num {
			case fieldGeneration:
				m.generation = v
			case fieldOpID:
				m.opID = v
			case fieldSrcRank:
				m.src = uint32(v)
			case fieldSeq:
				m.seq = uint32(v)
			}
		case protowire.BytesType:
			n, ok := p.varint()
			if !ok || n > 1<<40 {
				return errBadChunk
			}
			var fn func([]byte)
			if num == fieldPayload {
				fn = m.consume
				m.n += int(n)
			}
			if !p.take(int(n), fn) {
				return errBadChunk
			}
		case protowire.Fixed32Type:
			if !p.take(4, nil) {
				return errBadChunk
			}
		case protowire.Fixed64Type:
			if !p.take(8, nil) {
				return errBadChunk
			}
		default:
			return errBadChunk
		}
	}
	return nil
}
