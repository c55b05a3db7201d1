package data

import (
	"fmt"
	"math/bits"
	"sync"
)

// SplitMix64 is the SplitMix64 generator (Steele, Lea, Flood 2014, in the
// form of Vigna's public-domain reference): the state advances by the golden
// gamma and each output is the state passed through the mix64 finalizer. It is
// specified bit for bit in docs/dataset-format.md so that other languages can
// reproduce the sample order. The zero value is a generator seeded with 0.
type SplitMix64 struct {
	State uint64
}

const splitMixGamma = 0x9E3779B97F4A7C15

// mix64 is the SplitMix64 output finalizer.
func mix64(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
	z = (z ^ (z >> 27)) * 0x94D049BB133111EB
	return z ^ (z >> 31)
}

// Next returns the next 64-bit output.
func (g *SplitMix64) Next() uint64 {
	g.State += splitMixGamma
	return mix64(g.State)
}

// Below returns a uniform value in [0, n) for n > 0, by Lemire's
// multiply-and-reject method: the high half of Next()*n, drawing again while
// the low half is below (2^64 - n) mod n. It panics if n is 0.
func (g *SplitMix64) Below(n uint64) uint64 {
	if n == 0 {
		panic("data: SplitMix64.Below(0)")
	}
	hi, lo := bits.Mul64(g.Next(), n)
	if lo < n {
		thresh := -n % n
		for lo < thresh {
			hi, lo = bits.Mul64(g.Next(), n)
		}
	}
	return hi
}

// EpochSeed returns the generator state that starts the permutation of epoch
// e for the run seed: mix64(seed ^ mix64(e + gamma)). Distinct epochs get
// unrelated streams while the whole order stays a function of (seed, e).
func EpochSeed(seed, epoch uint64) uint64 {
	return mix64(seed ^ mix64(epoch+splitMixGamma))
}

// Permutation returns the sample order of one epoch: the identity on [0, n)
// shuffled by Fisher–Yates from the top (for i = n-1 down to 1, swap element i
// with element Below(i+1)) using a SplitMix64 started at EpochSeed(seed, epoch).
func Permutation(n int, seed, epoch uint64) []uint32 {
	p := make([]uint32, n)
	for i := range p {
		p[i] = uint32(i)
	}
	g := SplitMix64{State: EpochSeed(seed, epoch)}
	for i := n - 1; i > 0; i-- {
		j := g.Below(uint64(i) + 1)
		p[i], p[j] = p[j], p[i]
	}
	return p
}

// MaxSamples is the largest number of samples a Sampler shuffles: indices are
// held as uint32 to keep a permutation at 4 bytes per sample.
const MaxSamples = 1<<32 - 1

// Sampler maps global sample positions to sample indices: position g is
// element g mod n of the permutation of epoch g / n, i.e. the infinite
// sequence epoch 0's permutation, then epoch 1's, and so on. A Sampler is safe
// for concurrent use; it keeps the permutations of the two most recently built
// epochs (a step may straddle an epoch boundary).
type Sampler struct {
	n    uint64
	seed uint64

	mu    sync.Mutex
	cache [2]epochPerm
	next  int // cache slot to replace next
}

type epochPerm struct {
	epoch uint64
	perm  []uint32 // nil when the slot is empty
}

// NewSampler returns a sampler over numSamples samples for the run seed.
func NewSampler(numSamples uint64, seed uint64) (*Sampler, error) {
	if numSamples == 0 {
		return nil, fmt.Errorf("%w: sampler over 0 samples", ErrTooSmall)
	}
	if numSamples > MaxSamples {
		return nil, invalidf("numSamples %d exceeds %d", numSamples, uint64(MaxSamples))
	}
	return &Sampler{n: numSamples, seed: seed}, nil
}

// NumSamples returns the number of samples per epoch.
func (s *Sampler) NumSamples() uint64 { return s.n }

// Seed returns the run seed.
func (s *Sampler) Seed() uint64 { return s.seed }

// Epoch returns the epoch that global position pos falls in.
func (s *Sampler) Epoch(pos uint64) uint64 { return pos / s.n }

// SampleAt returns the sample index at global position pos.
func (s *Sampler) SampleAt(pos uint64) int {
	return int(s.perm(pos / s.n)[pos%s.n])
}

func (s *Sampler) perm(epoch uint64) []uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.cache {
		if c.perm != nil && c.epoch == epoch {
			return c.perm
		}
	}
	p := Permutation(int(s.n), s.seed, epoch)
	s.cache[s.next] = epochPerm{epoch: epoch, perm: p}
	s.next = 1 - s.next
	return p
}
