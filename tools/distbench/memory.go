package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"runtime/debug"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/ref"
)

// rankMemory measures one rank holding micro sequences of lk positions,
// with AdamW's moments for 1/shards of the parameters (ZeRO-1 over shards
// ranks; 1 keeps them whole): the live heap after a warm step (parameters,
// gradients, moments, the backend's activation workspace) plus every byte
// allocated during one more step, an upper bound of the step's peak heap.
func rankMemory(cfg model.Config, micro, lk, shards int) (int64, error) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	m, err := ref.New[float32](cfg)
	if err != nil {
		return 0, err
	}
	if err := model.Init(cfg, m.Layout(), m.Params(), 1); err != nil {
		return 0, err
	}
	n := (m.Layout().Total + shards - 1) / shards
	moments := [2][]float32{make([]float32, n), make([]float32, n)}
	rng := rand.New(rand.NewPCG(uint64(lk), 3))
	b := &model.Batch{Batch: micro, SeqLen: lk, Inputs: make([]int32, micro*lk), Targets: make([]int32, micro*lk)}
	for i := range b.Inputs {
		b.Inputs[i], b.Targets[i] = int32(rng.IntN(cfg.VocabSize)), int32(rng.IntN(cfg.VocabSize))
	}
	ctx := context.Background()
	if _, err := m.ForwardBackward(ctx, b, model.StepOptions{}); err != nil {
		return 0, err
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	live, total0 := ms.HeapAlloc, ms.TotalAlloc
	if _, err := m.ForwardBackward(ctx, b, model.StepOptions{}); err != nil {
		return 0, err
	}
	runtime.ReadMemStats(&ms)
	runtime.KeepAlive(moments)
	runtime.KeepAlive(m)
	return int64(live-base) + int64(ms.TotalAlloc-total0), nil
}

// memoryTable measures the memory of one rank as a function of the
// positions lk it holds, fits a + b·lk to three lengths, and prints, for
// sp = 1, 2, 4, 8, the longest sequence L = sp·lk (lk a multiple of the
// chunk) whose rank fits the budget, without and with ZeRO-1 over the sp
// ranks (which keeps 1/sp of AdamW's moments per rank). Each lk is the
// fit's estimate checked by measurement and lowered by a chunk at a time
// until the measurement fits.
func memoryTable(o options, cfg model.Config, out io.Writer) error {
	debug.SetGCPercent(100)
	q := cfg.ChunkSize
	lens := []int{4 * q, 8 * q, 16 * q}
	var mems []int64
	for _, lk := range lens {
		mem, err := rankMemory(cfg, o.micro, lk, 1)
		if err != nil {
			return err
		}
		mems = append(mems, mem)
	}
	b := float64(mems[2]-mems[0]) / float64(lens[2]-lens[0])
	a := float64(mems[0]) - b*float64(lens[0])
	mid := a + b*float64(lens[1])
	nparams := float64(model.NewLayout(cfg).Total)
	budget := int64(o.budgetMiB) << 20
	fmt.Fprintln(out)
	fmt.Fprintf(out, "# memory of one rank, micro-batch %d: live heap after a warm step + bytes allocated in one step\n", o.micro)
	for i, lk := range lens {
		fmt.Fprintf(out, "#   %5d positions: %7.1f MiB\n", lk, float64(mems[i])/(1<<20))
	}
	fmt.Fprintf(out, "# fit: %.1f MiB + %.1f KiB per position (the middle point is %.1f%% off the line)\n",
		a/(1<<20), b/(1<<10), 100*(float64(mems[1])-mid)/mid)
	fmt.Fprintf(out, "# budget %d MiB per rank; each length below is checked by measurement (MiB in brackets)\n\n", o.budgetMiB)
	// longest returns the largest measured lk that fits, starting from the
	// fit's estimate for moments sharded over shards ranks.
	longest := func(shards int) (int, int64, error) {
		fixed := a - 8*nparams*(1-1/float64(shards))
		lk := max(q, int((float64(budget)-fixed)/b)/q*q)
		for ; lk >= q; lk -= q {
			mem, err := rankMemory(cfg, o.micro, lk, shards)
			if err != nil {
				return 0, 0, err
			}
			if mem <= budget {
				return lk, mem, nil
			}
		}
		return 0, 0, fmt.Errorf("the budget of %d MiB does not hold one chunk of %d positions per rank", o.budgetMiB, q)
	}
	plain, plainMem, err := longest(1)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "| sp | longest sequence | positions per rank | with ZeRO-1 over the sp ranks | positions per rank |\n|---|---|---|---|---|\n")
	for _, sp := range []int{1, 2, 4, 8} {
		zlk, zmem := plain, plainMem
		if sp > 1 {
			if zlk, zmem, err = longest(sp); err != nil {
				return err
			}
		}
		fmt.Fprintf(out, "| %d | %d | %d (%.1f MiB) | %d | %d (%.1f MiB) |\n", sp, sp*plain, plain, float64(plainMem)/(1<<20), sp*zlk, zlk, float64(zmem)/(1<<20))
	}
	return nil
}
