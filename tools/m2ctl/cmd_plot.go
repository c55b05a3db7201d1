package main

import (
	"bufio"
	"bytes"
	"encoding/csv"
	"errors"
	"fmt"
	"image/color"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"

	"github.com/m2train/m2train/worker/metrics"
)

func init() { root.AddCommand(newPlotCmd()) }

func newPlotCmd() *cobra.Command {
	var in, out, title string
	cmd := &cobra.Command{
		Use:   "plot --metrics FILE --out PREFIX",
		Short: "Plot a run's loss and accuracy curves as PNG and SVG",
		Long: `Draws the training loss against the step, and below it the evaluation
accuracy when the run recorded any, into PREFIX.png and PREFIX.svg.

FILE is a metrics history (JSON Lines, docs/mqar.md) or a log of progress
lines as m2ctl train and m2ctl job watch print them ("step 40/200 ... loss
2.3125"); a log's "eval at step N: accuracy A" lines give the accuracy.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			h, err := readCurves(in)
			if err != nil {
				return usageError{err}
			}
			if len(h.Train) == 0 && len(h.Eval) == 0 {
				return usagef("--metrics: %s holds no training or evaluation records", in)
			}
			if title == "" {
				title = h.Header.Job
			}
			files, err := saveCurves(h, title, out)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), strings.Join(files, "\n"))
			return nil
		},
	}
	cmd.Flags().StringVar(&in, "metrics", "", "metrics history (.jsonl) or progress log (required)")
	cmd.Flags().StringVar(&out, "out", "", "output path without extension (required)")
	cmd.Flags().StringVar(&title, "title", "", "plot title; default the run's name")
	_ = cmd.MarkFlagRequired("metrics")
	_ = cmd.MarkFlagRequired("out")
	cmd.AddCommand(newPlotSweepCmd())
	return cmd
}

func newPlotSweepCmd() *cobra.Command {
	var table, out string
	cmd := &cobra.Command{
		Use:   "sweep --table results.csv --out PREFIX",
		Short: "Plot MQAR accuracy against model width for each state size",
		Long: `Draws the table of an MQAR sweep (m2ctl sweep mqar) as the Mamba-2 paper draws
its Figure 8: one panel per sequence length, the model width d_model on the
x axis, the accuracy on the y axis, one line per state size d_state. The
table needs the columns seq_len, d_model, d_state and accuracy; writes
PREFIX.png and PREFIX.svg.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rows, err := readSweepTable(table)
			if err != nil {
				return usageError{err}
			}
			files, err := saveSweepPlot(rows, out)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), strings.Join(files, "\n"))
			return nil
		},
	}
	cmd.Flags().StringVar(&table, "table", "", "sweep results CSV (required)")
	cmd.Flags().StringVar(&out, "out", "", "output path without extension (required)")
	_ = cmd.MarkFlagRequired("table")
	_ = cmd.MarkFlagRequired("out")
	return cmd
}

// readCurves reads a metrics history, or failing its header, a progress log.
func readCurves(path string) (*metrics.History, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	first := bytes.TrimSpace(b)
	if i := bytes.IndexByte(first, '\n'); i >= 0 {
		first = first[:i]
	}
	if bytes.Contains(first, []byte(`"`+metrics.Format+`"`)) {
		h, err := metrics.Read(bytes.NewReader(b))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		return h, nil
	}
	h, err := parseProgressLog(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	h.Header.Job = strings.TrimSuffix(filepath.Base(path), filepath.Ext(path))
	return h, nil
}

var (
	// progressRE matches m2ctl train's "step 4/200 [...] loss 2.5" and
	// m2ctl job watch's "job-1 running gen 1 [...] 4/200 2.0%  loss 2.5".
	progressRE = regexp.MustCompile(`(?:^|\s)(?:step\s+)?(\d+)/(\d+)\s.*?\bloss\s+(\S+)`)
	// evalLineRE matches "eval at step 40: accuracy 0.25 ...".
	evalLineRE = regexp.MustCompile(`\beval at step (\d+): accuracy (\S+)`)
)

// parseProgressLog turns progress lines into a history; other lines are
// skipped. Carriage returns (a terminal's redrawn bar) split lines too, and
// the last line of a step wins.
func parseProgressLog(r io.Reader) (*metrics.History, error) {
	train, eval := map[int]metrics.Record{}, map[int]metrics.Record{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		for _, line := range strings.Split(sc.Text(), "\r") {
			if m := evalLineRE.FindStringSubmatch(line); m != nil {
				step, _ := strconv.Atoi(m[1])
				acc, err := strconv.ParseFloat(m[2], 64)
				if err == nil && acc >= 0 && acc <= 1 {
					eval[step] = metrics.Record{Kind: metrics.KindEval, Step: step, Accuracy: acc}
				}
				continue
			}
			m := progressRE.FindStringSubmatch(line)
			if m == nil {
				continue
			}
			step, err1 := strconv.Atoi(m[1])
			total, err2 := strconv.Atoi(m[2])
			loss, err3 := strconv.ParseFloat(m[3], 64)
			if err1 != nil || err2 != nil || err3 != nil || math.IsNaN(loss) || math.IsInf(loss, 0) {
				continue
			}
			train[step] = metrics.Record{Kind: metrics.KindTrain, Step: step, TotalSteps: total, Loss: loss}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	h := &metrics.History{Header: metrics.Header{Format: metrics.Format, Version: metrics.Version}}
	for _, s := range slices.Sorted(maps.Keys(train)) {
		h.Train = append(h.Train, train[s])
	}
	for _, s := range slices.Sorted(maps.Keys(eval)) {
		h.Eval = append(h.Eval, eval[s])
	}
	return h, nil
}

// saveCurves draws the loss panel, and the accuracy panel under it when h
// has evaluations, into prefix.png and prefix.svg.
func saveCurves(h *metrics.History, title, prefix string) ([]string, error) {
	var panels [][]*plot.Plot
	lossPlot := plot.New()
	lossPlot.Title.Text = title
	lossPlot.X.Label.Text = "step"
	lossPlot.Y.Label.Text = "loss"
	if len(h.Train) > 0 {
		pts := make(plotter.XYs, len(h.Train))
		for i, r := range h.Train {
			pts[i] = plotter.XY{X: float64(r.Step), Y: r.Loss}
		}
		l, err := plotter.NewLine(pts)
		if err != nil {
			return nil, err
		}
		l.Color = plotutil.Color(0)
		lossPlot.Add(l)
		lossPlot.Legend.Add("training loss", l)
	}
	var evalLoss, acc plotter.XYs
	for _, r := range h.Eval {
		acc = append(acc, plotter.XY{X: float64(r.Step), Y: r.Accuracy})
		if r.Loss > 0 {
			evalLoss = append(evalLoss, plotter.XY{X: float64(r.Step), Y: r.Loss})
		}
	}
	if len(evalLoss) > 0 {
		l, s, err := plotter.NewLinePoints(evalLoss)
		if err != nil {
			return nil, err
		}
		l.Color, s.Color = plotutil.Color(1), plotutil.Color(1)
		lossPlot.Add(l, s)
		lossPlot.Legend.Add("held-out loss on the answers", l, s)
	}
	lossPlot.Legend.Top = true
	lossPlot.Add(plotter.NewGrid())
	panels = append(panels, []*plot.Plot{lossPlot})
	if len(acc) > 0 {
		p := plot.New()
		p.X.Label.Text = "step"
		p.Y.Label.Text = "accuracy"
		p.Y.Min, p.Y.Max = 0, 1
		l, s, err := plotter.NewLinePoints(acc)
		if err != nil {
			return nil, err
		}
		l.Color, s.Color = plotutil.Color(2), plotutil.Color(2)
		p.Add(l, s, plotter.NewGrid())
		p.Legend.Add("held-out accuracy", l, s)
		p.Legend.Top = true
		p.Legend.Left = true
		p.X.Min, p.X.Max = lossPlot.X.Min, lossPlot.X.Max
		panels = append(panels, []*plot.Plot{p})
	}
	return savePanels(panels, 16*vg.Centimeter, vg.Length(len(panels))*9*vg.Centimeter, prefix)
}

// sweepPoint is one row of a sweep table as the plot needs it.
type sweepPoint struct {
	SeqLen, DModel, DState int
	Accuracy               float64
}

// readSweepTable reads the columns seq_len, d_model, d_state and accuracy
// of a CSV table with a header row; other columns are ignored.
func readSweepTable(path string) ([]sweepPoint, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(recs) < 2 {
		return nil, fmt.Errorf("%s: no rows under the header", path)
	}
	col := map[string]int{}
	for i, name := range recs[0] {
		col[strings.TrimSpace(name)] = i
	}
	for _, name := range []string{"seq_len", "d_model", "d_state", "accuracy"} {
		if _, ok := col[name]; !ok {
			return nil, fmt.Errorf("%s: the header lacks the column %q", path, name)
		}
	}
	var out []sweepPoint
	for n, rec := range recs[1:] {
		field := func(name string) string { return strings.TrimSpace(rec[col[name]]) }
		var p sweepPoint
		var errs []error
		for _, c := range []struct {
			name string
			dst  *int
		}{{"seq_len", &p.SeqLen}, {"d_model", &p.DModel}, {"d_state", &p.DState}} {
			v, err := strconv.Atoi(field(c.name))
			if err != nil || v < 1 {
				errs = append(errs, fmt.Errorf("%s %q is not a positive integer", c.name, field(c.name)))
			}
			*c.dst = v
		}
		if field("accuracy") == "" {
			continue // a point that has not finished
		}
		acc, err := strconv.ParseFloat(field("accuracy"), 64)
		if err != nil || !(acc >= 0 && acc <= 1) {
			errs = append(errs, fmt.Errorf("accuracy %q is not a number in [0, 1]", field("accuracy")))
		}
		p.Accuracy = acc
		if err := errors.Join(errs...); err != nil {
			return nil, fmt.Errorf("%s: row %d: %w", path, n+2, err)
		}
		out = append(out, p)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no row has an accuracy yet", path)
	}
	return out, nil
}

// saveSweepPlot draws one panel per sequence length: accuracy against
// d_model, one line per d_state. Of several rows of one (seq_len, d_model,
// d_state), as a sweep over learning rates gives, the most accurate counts.
func saveSweepPlot(rows []sweepPoint, prefix string) ([]string, error) {
	type key struct{ L, D, N int }
	at := map[key]int{}
	var points []sweepPoint
	for _, r := range rows {
		k := key{r.SeqLen, r.DModel, r.DState}
		if i, ok := at[k]; !ok {
			at[k] = len(points)
			points = append(points, r)
		} else if r.Accuracy > points[i].Accuracy {
			points[i] = r
		}
	}
	var seqLens, dStates, dModels []int
	for _, p := range points {
		seqLens, dStates, dModels = append(seqLens, p.SeqLen), append(dStates, p.DState), append(dModels, p.DModel)
	}
	for _, s := range []*[]int{&seqLens, &dStates, &dModels} {
		slices.Sort(*s)
		*s = slices.Compact(*s)
	}
	ticks := make(plot.ConstantTicks, len(dModels))
	for i, d := range dModels {
		ticks[i] = plot.Tick{Value: float64(d), Label: strconv.Itoa(d)}
	}
	row := make([]*plot.Plot, len(seqLens))
	// One legend for all panels, to their right, where it hides no point.
	legend := plot.NewLegend()
	legend.Top = true
	thumbs := map[int][]plot.Thumbnailer{}
	for i, L := range seqLens {
		p := plot.New()
		p.Title.Text = fmt.Sprintf("sequence length %d", L)
		p.X.Label.Text = "model dimension (d_model)"
		p.Y.Label.Text = "accuracy"
		p.Y.Min, p.Y.Max = 0, 1
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = ticks
		p.X.Min, p.X.Max = float64(dModels[0])/1.25, float64(dModels[len(dModels)-1])*1.25
		p.Add(plotter.NewGrid())
		for k, N := range dStates {
			var xy plotter.XYs
			for _, q := range points {
				if q.SeqLen == L && q.DState == N {
					xy = append(xy, plotter.XY{X: float64(q.DModel), Y: q.Accuracy})
				}
			}
			if len(xy) == 0 {
				continue
			}
			slices.SortFunc(xy, func(a, b plotter.XY) int { return int(a.X - b.X) })
			l, s, err := plotter.NewLinePoints(xy)
			if err != nil {
				return nil, err
			}
			l.Color, s.Color, s.Shape = plotutil.Color(k), plotutil.Color(k), plotutil.Shape(k)
			p.Add(l, s)
			if _, ok := thumbs[N]; !ok {
				thumbs[N] = []plot.Thumbnailer{l, s}
			}
		}
		row[i] = p
	}
	for _, N := range dStates {
		legend.Add(fmt.Sprintf("d_state %d", N), thumbs[N]...)
	}
	return savePanelsLegend([][]*plot.Plot{row}, &legend, vg.Length(len(row))*10*vg.Centimeter, 9*vg.Centimeter, prefix)
}

// savePanels lays out rows of plots on one page of w × h and writes it to
// prefix.png and prefix.svg, each through a temporary file and a rename.
func savePanels(panels [][]*plot.Plot, w, h vg.Length, prefix string) ([]string, error) {
	return savePanelsLegend(panels, nil, w, h, prefix)
}

// legendWidth is the strip right of the panels that a shared legend takes.
const legendWidth = 3 * vg.Centimeter

// savePanelsLegend is savePanels with, when legend is not nil, the legend
// drawn in a strip of legendWidth to the right of the panels.
func savePanelsLegend(panels [][]*plot.Plot, legend *plot.Legend, w, h vg.Length, prefix string) ([]string, error) {
	if legend != nil {
		w += legendWidth
	}
	if dir := filepath.Dir(prefix); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
	}
	tiles := draw.Tiles{Rows: len(panels), Cols: len(panels[0]), PadX: vg.Centimeter, PadY: vg.Centimeter / 2,
		PadTop: vg.Centimeter / 4, PadBottom: vg.Centimeter / 4, PadLeft: vg.Centimeter / 4, PadRight: vg.Centimeter / 2}
	render := func(c vg.CanvasSizer) {
		dc := draw.New(c)
		if legend != nil {
			legend.Draw(draw.Crop(dc, w-legendWidth, 0, 0, -vg.Centimeter))
			dc = draw.Crop(dc, 0, -legendWidth, 0, 0)
		}
		canvases := plot.Align(panels, tiles, dc)
		for i, row := range panels {
			for j, p := range row {
				if p != nil {
					p.Draw(canvases[i][j])
				}
			}
		}
	}
	png := vgimg.PngCanvas{Canvas: vgimg.NewWith(vgimg.UseWH(w, h), vgimg.UseDPI(144), vgimg.UseBackgroundColor(color.White))}
	render(png.Canvas)
	svg := vgsvg.New(w, h)
	render(svg)
	var files []string
	for _, f := range []struct {
		ext string
		w   io.WriterTo
	}{{".png", png}, {".svg", svg}} {
		path := prefix + f.ext
		if err := writeFileAtomic(path, f.w); err != nil {
			return nil, err
		}
		files = append(files, path)
	}
	return files, nil
}

// writeFileAtomic writes what w produces to path through a temporary file
// in the same directory and a rename.
func writeFileAtomic(path string, w io.WriterTo) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	_, err = w.WriteTo(tmp)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
