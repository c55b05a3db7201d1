package grpcnet

import (
	"math/bits"
	"sync"
)

// bufferPool recycles gRPC's frame and message buffers by power-of-two size
// class. Unlike gRPC's default pool it does not zero a buffer it hands out:
// gRPC fills every buffer it takes from the pool (frames are read in full
// before use), and the chunks of a collective are large enough that zeroing
// costs as much as a copy.
type bufferPool struct {
	classes [40]sync.Pool
}

func (p *bufferPool) Get(n int) *[]byte {
	c := bits.Len(uint(max(n, 1) - 1))
	if c >= len(p.classes) {
		b := make([]byte, n)
		return &b
	}
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<c)
	return &b
}

func (p *bufferPool) Put(b *[]byte) {
	c := bits.Len(uint(max(cap(*b), 1) - 1))
	if c >= len(p.classes) || cap(*b) != 1<<c {
		return
	}
	p.classes[c].Put(b)
}

var framePool = &bufferPool{}
