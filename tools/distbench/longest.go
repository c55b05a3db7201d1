package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
)

// resolution is where the longest-sequence search stops bisecting: when
// the longest fitting and the shortest failing length differ by at most
// 1/frac of the longest fitting one, or by positions when that is set.
type resolution struct {
	frac      int
	positions int
}

// parseResolution reads -long-res: "1/K" or a number of positions.
func parseResolution(s string) (resolution, error) {
	if k, ok := strings.CutPrefix(strings.TrimSpace(s), "1/"); ok {
		frac, err := strconv.Atoi(k)
		if err != nil || frac < 1 {
			return resolution{}, fmt.Errorf("-long-res: %q is not 1/K with K a positive integer", s)
		}
		return resolution{frac: frac}, nil
	}
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 1 {
		return resolution{}, fmt.Errorf("-long-res: %q is neither 1/K nor a positive number of positions", s)
	}
	return resolution{positions: n}, nil
}

func (r resolution) String() string {
	if r.positions > 0 {
		return fmt.Sprintf("%d positions", r.positions)
	}
	return fmt.Sprintf("1/%d of the longest fitting length", r.frac)
}

// at is the resolution in positions when last is the longest fitting
// length: rounded down to a multiple of q, and at least q.
func (r resolution) at(last, q int) int {
	v := r.positions
	if v == 0 {
		v = last / r.frac
	}
	return max(q, v/q*q)
}

// searchConfig bounds the longest-sequence search.
type searchConfig struct {
	quantum int // every length tried is a multiple of it (chunk·sp)
	start   int // the first length, rounded up to a multiple of quantum
	max     int // no length beyond it is tried
	res     resolution
}

// trial is one length the search tried.
type trial struct {
	L    int
	fits bool
}

// searchResult is the outcome of searchLongest.
type searchResult struct {
	longest int  // the longest length that fitted; 0 when not even quantum did
	capped  bool // longest is the largest multiple of quantum within max: it may fit longer
	trials  []trial
}

// searchLongest finds the longest length L, a multiple of c.quantum no
// larger than c.max, for which fits(L) holds, assuming that fits is
// monotone (true up to some length and false beyond). It tries c.start,
// doubles while the length fits (halves while it does not, when the start
// itself does not fit), then bisects between the longest length that
// fitted and the shortest that did not until they differ by at most the
// resolution. An error from fits ends the search with that error; the
// result then holds the trials so far.
func searchLongest(c searchConfig, fits func(L int) (bool, error)) (searchResult, error) {
	var res searchResult
	q := c.quantum
	if q < 1 {
		return res, fmt.Errorf("search: the quantum must be at least 1, got %d", q)
	}
	top := c.max / q * q
	if top < q {
		return res, fmt.Errorf("search: the longest length %d is shorter than one quantum of %d", c.max, q)
	}
	try := func(L int) (bool, error) {
		ok, err := fits(L)
		if err != nil {
			return false, fmt.Errorf("length %d: %w", L, err)
		}
		res.trials = append(res.trials, trial{L: L, fits: ok})
		return ok, nil
	}
	lo, hi := 0, 0 // the longest length that fitted, the shortest that did not
	L := min(max(q, (c.start+q-1)/q*q), top)
	for {
		ok, err := try(L)
		if err != nil {
			return res, err
		}
		if !ok {
			hi = L
			break
		}
		lo = L
		if L == top {
			res.longest, res.capped = top, true
			return res, nil
		}
		L = min(2*L, top)
	}
	for lo == 0 {
		if hi == q {
			return res, nil // not one quantum fits
		}
		L = max(q, hi/2/q*q)
		ok, err := try(L)
		if err != nil {
			return res, err
		}
		if ok {
			lo = L
		} else {
			hi = L
		}
	}
	for hi-lo > c.res.at(lo, q) {
		// hi − lo is a multiple of q larger than q, so mid lies strictly
		// between them.
		mid := lo + (hi-lo)/2/q*q
		ok, err := try(mid)
		if err != nil {
			return res, err
		}
		if ok {
			lo = mid
		} else {
			hi = mid
		}
	}
	res.longest = lo
	return res, nil
}

// trialResult is one trial of the longest-sequence search on the GPUs.
type trialResult struct {
	L          int
	fits       bool
	oom        string  // the out-of-memory error when it does not fit
	stepSec    float64 // the last step's time, the slowest rank's
	lossFirst  float64
	deviceUsed int64 // the largest over the ranks
}

// longestRow is the search's answer for one sp.
type longestRow struct {
	SP               int         `json:"sp"`
	Longest          int         `json:"longest_seq_len"` // 0: not one chunk·sp fits
	PositionsPerRank int         `json:"positions_per_rank"`
	DeviceUsedPeak   int64       `json:"device_used_peak_bytes"` // total − free after the step, the largest over the ranks
	RatioToSP1       *float64    `json:"ratio_to_sp1"`           // null without sp = 1 in the search
	StepSec          float64     `json:"step_s"`                 // the last step's time at the longest length
	LossFirst        float64     `json:"loss_first"`             // the first step's loss at the longest length
	Capped           bool        `json:"capped"`                 // the longest length is -long-max's: longer may fit
	Trials           []trialJSON `json:"trials"`
}

// trialJSON is one trial in the JSON report.
type trialJSON struct {
	SeqLen         int     `json:"seq_len"`
	Fits           bool    `json:"fits"`
	StepSec        float64 `json:"step_s,omitempty"`
	LossFirst      float64 `json:"loss_first,omitempty"`
	DeviceUsedPeak int64   `json:"device_used_peak_bytes,omitempty"`
	OOM            string  `json:"oom,omitempty"`
}

// runTrial trains one sequence of length L split over sp ranks, one per
// GPU, in fresh processes: it fits unless a rank runs out of GPU memory.
// Any other failure, a non-finite loss included, is an error.
func runTrial(ctx context.Context, o options, g gpuPlan, sp, L int) (trialResult, error) {
	tr := trialResult{L: L}
	j := job{l: layout{dp: 1, sp: sp}, seq: L, micro: 1, global: 1, warmup: o.longSteps - 1, steps: 1, quiet: true, gpu: g}
	res, err := runRanks(ctx, o, j)
	var oom *oomError
	if errors.As(err, &oom) {
		tr.oom = oom.Error()
		return tr, nil
	}
	if err != nil {
		return tr, err
	}
	tr.fits = true
	tr.lossFirst = res[0].LossFirst
	for _, r := range res {
		tr.stepSec = max(tr.stepSec, r.StepSec)
		tr.deviceUsed = max(tr.deviceUsed, r.DeviceUsed)
		if math.IsNaN(r.Loss) || math.IsInf(r.Loss, 0) || math.IsNaN(r.LossFirst) || math.IsInf(r.LossFirst, 0) {
			return tr, fmt.Errorf("rank %d: the loss is not finite (first step %v, last %v)", r.Rank, r.LossFirst, r.Loss)
		}
	}
	return tr, nil
}

// longestTable runs the longest-sequence search for every sp of -long-sp
// and prints its trials and the table; it returns the rows for the JSON
// report.
func longestTable(ctx context.Context, o options, g gpuPlan, out io.Writer) ([]longestRow, error) {
	lnV := math.Log(float64(o.vocab))
	fmt.Fprintf(out, "\n# longest sequence: one sequence (micro-batch 1, global batch 1, dp 1) split over sp ranks, one GPU each;\n")
	fmt.Fprintf(out, "# a length fits when %d training step(s) run without a CUDA out-of-memory error; doubling from %d up to %d,\n", o.longSteps, o.longStart, o.longMax)
	fmt.Fprintf(out, "# then bisecting to %v (multiples of chunk·sp); every trial fresh rank processes.\n", o.longRes)
	fmt.Fprintf(out, "# first-step loss of a fresh model on uniform tokens: about ln(vocab) = %.3f\n", lnV)
	var rows []longestRow
	for _, sp := range o.longSP {
		byL := map[int]trialResult{}
		fits := func(L int) (bool, error) {
			tr, err := runTrial(ctx, o, g, sp, L)
			if err != nil {
				return false, err
			}
			byL[L] = tr
			if tr.fits {
				fmt.Fprintf(out, "#   sp %d, L %8d: fits: step %.3f s, %.2f GiB in use, first loss %.4f (ln V %.3f)\n",
					sp, L, tr.stepSec, gib(tr.deviceUsed), tr.lossFirst, lnV)
			} else {
				fmt.Fprintf(out, "#   sp %d, L %8d: does not fit (%s)\n", sp, L, firstLine(tr.oom))
			}
			return tr.fits, nil
		}
		sr, err := searchLongest(searchConfig{quantum: o.chunk * sp, start: o.longStart, max: o.longMax, res: o.longRes}, fits)
		if err != nil {
			return rows, fmt.Errorf("longest sequence with sp %d: %w", sp, err)
		}
		row := longestRow{SP: sp, Longest: sr.longest, PositionsPerRank: sr.longest / sp, Capped: sr.capped}
		if best, ok := byL[sr.longest]; ok {
			row.DeviceUsedPeak, row.StepSec, row.LossFirst = best.deviceUsed, best.stepSec, best.lossFirst
		}
		for _, t := range sr.trials {
			tr := byL[t.L]
			row.Trials = append(row.Trials, trialJSON{SeqLen: t.L, Fits: t.fits, StepSec: tr.stepSec, LossFirst: tr.lossFirst,
				DeviceUsedPeak: tr.deviceUsed, OOM: tr.oom})
		}
		rows = append(rows, row)
	}
	var base int
	for _, r := range rows {
		if r.SP == 1 {
			base = r.Longest
		}
	}
	fmt.Fprintf(out, "\n| sp | longest sequence | positions per rank | GPU memory in use, max over ranks (GiB) | vs sp=1 | step at that length (s) | first loss |\n|---|---|---|---|---|---|---|\n")
	for i := range rows {
		r := &rows[i]
		if base > 0 && r.Longest > 0 {
			v := float64(r.Longest) / float64(base)
			r.RatioToSP1 = &v
		}
		if r.Longest == 0 {
			fmt.Fprintf(out, "| %d | none (not even %d) | - | - | - | - | - |\n", r.SP, o.chunk*r.SP)
			continue
		}
		longest := strconv.Itoa(r.Longest)
		if r.Capped {
			longest = "≥ " + longest + " (-long-max)"
		}
		ratio := "-"
		if r.RatioToSP1 != nil {
			ratio = fmt.Sprintf("%.2f×", *r.RatioToSP1)
		}
		fmt.Fprintf(out, "| %d | %s | %d | %.2f | %s | %.3f | %.4f |\n", r.SP, longest, r.PositionsPerRank, gib(r.DeviceUsedPeak), ratio, r.StepSec, r.LossFirst)
	}
	return rows, nil
}

func gib(b int64) float64 { return float64(b) / (1 << 30) }

// firstLine is s up to its first newline.
func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}
