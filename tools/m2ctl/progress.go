package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/m2train/m2train/worker/train"
)

// progressBar draws training progress on a terminal (redrawn in place) or,
// when the output is not a terminal, as one line every few seconds.
type progressBar struct {
	w        io.Writer
	tty      bool
	last     time.Time
	interval time.Duration
}

func newProgressBar(w io.Writer) *progressBar {
	tty := false
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	return &progressBar{w: w, tty: tty, interval: 5 * time.Second}
}

// Update draws p; the final step is always drawn.
func (b *progressBar) Update(p train.Progress) {
	final := p.Step >= p.TotalSteps
	if !b.tty && !final && time.Since(b.last) < b.interval && p.Step > 1 {
		return
	}
	b.last = time.Now()
	line := formatProgress(p, 30)
	if b.tty {
		fmt.Fprintf(b.w, "\r\033[K%s", line)
		if final {
			fmt.Fprintln(b.w)
		}
		return
	}
	fmt.Fprintln(b.w, line)
}

// formatProgress renders one progress line with a bar of width cells.
func formatProgress(p train.Progress, width int) string {
	frac := 0.0
	if p.TotalSteps > 0 {
		frac = min(1, float64(p.Step)/float64(p.TotalSteps))
	}
	filled := int(frac * float64(width))
	bar := strings.Repeat("=", filled)
	if filled < width {
		bar += ">" + strings.Repeat(" ", width-filled-1)
	}
	return fmt.Sprintf("step %d/%d [%s] loss %.4f | lr %.2e | %s tok/s | ETA %s",
		p.Step, p.TotalSteps, bar, p.Loss, p.LR, humanRate(p.TokensPerSec), p.ETA.Round(time.Second))
}

func humanRate(r float64) string {
	switch {
	case r >= 1e6:
		return fmt.Sprintf("%.2fM", r/1e6)
	case r >= 1e3:
		return fmt.Sprintf("%.1fk", r/1e3)
	default:
		return fmt.Sprintf("%.0f", r)
	}
}
