package cli

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/m2train/m2train/coordinator/jobspec"
	pb "github.com/m2train/m2train/proto/coordinator/v1"
)

// progressBar renders a job's progress: redrawn in place on a terminal, one
// line per new step or state otherwise.
type progressBar struct {
	w         io.Writer
	tty       bool
	drawn     bool
	lastStep  int64
	lastState pb.JobState
	lastGen   uint64
}

func newProgressBar(w io.Writer, tty bool) *progressBar {
	return &progressBar{w: w, tty: tty, lastStep: -1}
}

const barWidth = 30

func (b *progressBar) update(j *pb.Job) {
	p := j.GetProgress()
	if b.tty {
		fmt.Fprintf(b.w, "\r%s\x1b[K", progressLine(j, barWidth))
		b.drawn = true
		return
	}
	if p.GetStep() == b.lastStep && j.GetState() == b.lastState && j.GetGeneration() == b.lastGen {
		return
	}
	b.lastStep, b.lastState, b.lastGen = p.GetStep(), j.GetState(), j.GetGeneration()
	fmt.Fprintln(b.w, progressLine(j, 0))
}

func (b *progressBar) finish() {
	if b.tty && b.drawn {
		fmt.Fprintln(b.w)
	}
}

// progressLine is "<id> <state> gen G [bar] step/total pct loss L tok/s T
// ETA E"; barWidth 0 leaves the bar out.
func progressLine(j *pb.Job, width int) string {
	p := j.GetProgress()
	var sb strings.Builder
	fmt.Fprintf(&sb, "%s %s gen %d", j.GetId(), stateName(j.GetState()), j.GetGeneration())
	total := p.GetTotalSteps()
	frac := 0.0
	if total > 0 {
		frac = float64(p.GetStep()) / float64(total)
	}
	if width > 0 {
		n := min(int(frac*float64(width)+0.5), width)
		fmt.Fprintf(&sb, " [%s%s]", strings.Repeat("#", n), strings.Repeat(".", width-n))
	}
	fmt.Fprintf(&sb, " %d/%d %5.1f%%", p.GetStep(), total, 100*frac)
	if p.GetUpdatedAt() == nil {
		return sb.String()
	}
	fmt.Fprintf(&sb, "  loss %.4f  %s tok/s", p.GetLoss(), si(p.GetTokensPerSec()))
	if eta, ok := etaOf(j); ok && j.GetState() == pb.JobState_JOB_STATE_RUNNING {
		fmt.Fprintf(&sb, "  ETA %s", shortDuration(eta))
	}
	return sb.String()
}

// etaOf estimates the time left from the throughput: the remaining steps
// times the tokens of one step (global_batch · seq_len) over tokens/s.
func etaOf(j *pb.Job) (time.Duration, bool) {
	p := j.GetProgress()
	if p.GetTokensPerSec() <= 0 || p.GetTotalSteps() <= p.GetStep() {
		return 0, p.GetTotalSteps() > 0 && p.GetTotalSteps() <= p.GetStep()
	}
	spec, err := jobspec.Decode([]byte(j.GetSpecYaml()))
	if err != nil {
		return 0, false
	}
	spec.Normalize()
	perStep := float64(spec.Batch.GlobalBatch) * float64(spec.Data.SeqLen)
	if perStep <= 0 {
		return 0, false
	}
	secs := float64(p.GetTotalSteps()-p.GetStep()) * perStep / p.GetTokensPerSec()
	if secs > 1e9 {
		return 0, false
	}
	return time.Duration(secs * float64(time.Second)), true
}

// si formats a rate with a k/M/G suffix.
func si(v float64) string {
	switch {
	case v >= 1e9:
		return fmt.Sprintf("%.1fG", v/1e9)
	case v >= 1e6:
		return fmt.Sprintf("%.1fM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.1fk", v/1e3)
	}
	return fmt.Sprintf("%.0f", v)
}
