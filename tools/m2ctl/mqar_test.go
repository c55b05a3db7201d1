package main

import (
	"encoding/csv"
	"encoding/json"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/model/ref"
	"github.com/m2train/m2train/model/safetensors"
	"github.com/m2train/m2train/worker/metrics"
)

// tinyCheckpoint writes a randomly initialised 1-layer model with a
// vocabulary of 64 as a Hugging Face directory; edit may change its
// parameters first.
func tinyCheckpoint(t *testing.T, edit func(cfg model.Config, l *model.Layout, p []float32)) string {
	t.Helper()
	cfg := model.DefaultConfig(16, 1, 64)
	cfg.DState, cfg.HeadDim, cfg.ChunkSize = 8, 8, 16
	cfg.NHeads = cfg.Expand * cfg.DModel / cfg.HeadDim
	m, err := ref.New[float32](cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := model.Init(cfg, m.Layout(), m.Params(), 3); err != nil {
		t.Fatal(err)
	}
	if edit != nil {
		edit(cfg, m.Layout(), m.Params())
	}
	dir := filepath.Join(t.TempDir(), "ckpt")
	if err := hf.SaveCheckpoint(dir, cfg, m.Layout(), m.Params(), safetensors.F32); err != nil {
		t.Fatal(err)
	}
	return dir
}

func evalJSON(t *testing.T, args ...string) mqarEvalResult {
	t.Helper()
	out, code := m2ctl(t, append([]string{"eval", "mqar", "-o", "json"}, args...)...)
	if code != 0 {
		t.Fatalf("eval mqar: exit %d: %s", code, out)
	}
	var r mqarEvalResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("eval mqar output is not JSON: %v\n%s", err, out)
	}
	return r
}

// binomialUpper returns the smallest k with P(X >= k) <= alpha for X ~
// Binomial(n, p), by the Chernoff bound exp(-n·KL(k/n || p)).
func binomialUpper(n int, p, alpha float64) int {
	for k := int(math.Ceil(float64(n) * p)); k <= n; k++ {
		q := float64(k) / float64(n)
		kl := q * math.Log(q/p)
		if q < 1 {
			kl += (1 - q) * math.Log((1-q)/(1-p))
		}
		if math.Exp(-float64(n)*kl) <= alpha {
			return k
		}
	}
	return n
}

// TestEvalMQARUntrainedModel: a random model cannot know the values, so
// it answers right about as often as a guess among the V/2 value tokens;
// the bound is where that guess's binomial tail falls below 1e-6.
func TestEvalMQARUntrainedModel(t *testing.T) {
	dir := tinyCheckpoint(t, nil)
	r := evalJSON(t, "--checkpoint", dir, "--vocab-size", "64", "--num-pairs", "4", "--seq-len", "32", "--samples", "64", "--seed", "5")
	if r.Sequences != 64 || r.Answers != 64*4 || r.Stream != "eval" || r.Seed != 5 || r.Checkpoint != dir {
		t.Errorf("result = %+v, want 64 sequences, 256 answers of the eval stream of seed 5", r)
	}
	bound := binomialUpper(r.Answers, r.ValueChance, 1e-6)
	t.Logf("untrained model: %d/%d right; chance %.4f, bound %d", r.Correct, r.Answers, r.ValueChance, bound)
	if r.Correct > bound || r.Accuracy != float64(r.Correct)/float64(r.Answers) {
		t.Errorf("untrained model scores %d/%d, above the chance bound %d", r.Correct, r.Answers, bound)
	}
	if !(r.Loss > 0) || math.IsInf(r.Loss, 0) {
		t.Errorf("loss on the answers = %v", r.Loss)
	}
	// The evaluation is deterministic, whatever the batch size.
	again := evalJSON(t, "--checkpoint", dir, "--vocab-size", "64", "--num-pairs", "4", "--seq-len", "32", "--samples", "64", "--seed", "5", "--batch", "7")
	if again.Correct != r.Correct || math.Abs(again.Loss-r.Loss) > 1e-9*r.Loss {
		t.Errorf("batch 7 gives %d right, loss %v; default batch %d, %v", again.Correct, again.Loss, r.Correct, r.Loss)
	}
}

// TestEvalMQARWrongModel: with the final norm's weight zero every logit is
// 0, the argmax is token 0, which is never a value: accuracy exactly 0.
func TestEvalMQARWrongModel(t *testing.T) {
	dir := tinyCheckpoint(t, func(_ model.Config, l *model.Layout, p []float32) {
		clear(model.View(p, l.Must(model.NameNormF)))
	})
	r := evalJSON(t, "--checkpoint", dir, "--vocab-size", "64", "--num-pairs", "4", "--seq-len", "32", "--samples", "16")
	if r.Correct != 0 || r.Answers != 64 || r.Accuracy != 0 {
		t.Errorf("constant model: %d/%d right, accuracy %v; want 0/64", r.Correct, r.Answers, r.Accuracy)
	}
	if want := math.Log(64); math.Abs(r.Loss-want) > 1e-5 {
		t.Errorf("constant model's loss %v, want ln 64 = %v", r.Loss, want)
	}
}

func TestEvalMQARBadInput(t *testing.T) {
	dir := tinyCheckpoint(t, nil)
	tmp := t.TempDir()
	pathSpec := filepath.Join(tmp, "path.yaml")
	os.WriteFile(pathSpec, []byte("name: a\nmodel: {init_from: /m}\ndata: {path: /d, seq_len: 8}\nschedule: {total_steps: 1}\n"), 0o644)
	task := []string{"--vocab-size", "64", "--num-pairs", "4", "--seq-len", "32"}
	for _, tc := range []struct {
		name string
		args []string
		msg  string
	}{
		{"no checkpoint flag", task, "checkpoint"},
		{"no checkpoint", append([]string{"--checkpoint", tmp}, task...), "neither config.json nor committed step-N"},
		{"no task", []string{"--checkpoint", dir}, "--vocab-size is required without --spec"},
		{"too many pairs", []string{"--checkpoint", dir, "--vocab-size", "64", "--num-pairs", "40", "--seq-len", "200"}, "NumPairs 40"},
		{"sequence too short", []string{"--checkpoint", dir, "--vocab-size", "64", "--num-pairs", "4", "--seq-len", "15"}, "SeqLen 15"},
		{"task vocabulary above the model's", []string{"--checkpoint", dir, "--vocab-size", "128", "--num-pairs", "4", "--seq-len", "32"}, "exceeds the model's vocab_size 64"},
		{"spec without mqar", []string{"--checkpoint", dir, "--spec", pathSpec}, "not data.mqar"},
		{"missing spec", []string{"--checkpoint", dir, "--spec", filepath.Join(tmp, "none.yaml")}, "none.yaml"},
		{"bad stream", append([]string{"--checkpoint", dir, "--stream", "test"}, task...), "--stream"},
		{"bad output", append([]string{"--checkpoint", dir, "-o", "yaml"}, task...), "--output"},
		{"no samples", append([]string{"--checkpoint", dir, "--samples", "0"}, task...), "--samples"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := m2ctl(t, append([]string{"eval", "mqar"}, tc.args...)...)
			if code != exitUsage || !strings.Contains(out, tc.msg) {
				t.Errorf("exit %d, output %q; want exit %d mentioning %q", code, out, exitUsage, tc.msg)
			}
		})
	}
}

func TestParseProgressLog(t *testing.T) {
	log := "backend: cpu-float32\n" +
		"step 1/4 [=>   ] loss 4.5000 | lr 1.00e-03 | 2.3k tok/s | ETA 1s\r\x1b[Kstep 2/4 [==> ] loss 4.2500 | lr 1.00e-03 | 2.3k tok/s | ETA 1s\n" +
		"eval at step 2: accuracy 0.1250 (4/32 answers), loss on the answers 3.9\n" +
		"job-1 running gen 1 [###.] 3/4  75.0%  loss 4.0000  2.1k tok/s  ETA 1s\n" +
		"step 3/4 [===>] loss NaN | lr 1e-3\n" + // not finite: skipped, the job watch line of step 3 stays
		"unrelated line 5/6 without the word\n"
	h, err := parseProgressLog(strings.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range h.Train {
		got = append(got, strconv.Itoa(r.Step)+"/"+strconv.Itoa(r.TotalSteps)+":"+strconv.FormatFloat(r.Loss, 'g', -1, 64))
	}
	if strings.Join(got, " ") != "1/4:4.5 2/4:4.25 3/4:4" {
		t.Errorf("train records %v", got)
	}
	if len(h.Eval) != 1 || h.Eval[0].Step != 2 || h.Eval[0].Accuracy != 0.125 {
		t.Errorf("eval records %+v", h.Eval)
	}
}

func checkImages(t *testing.T, prefix string, svgHas ...string) {
	t.Helper()
	f, err := os.Open(prefix + ".png")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("%s.png: %v", prefix, err)
	}
	if b := img.Bounds(); b.Dx() < 400 || b.Dy() < 300 {
		t.Errorf("%s.png is %v", prefix, b)
	}
	svg, err := os.ReadFile(prefix + ".svg")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range append([]string{"<svg"}, svgHas...) {
		if !strings.Contains(string(svg), s) {
			t.Errorf("%s.svg lacks %q", prefix, s)
		}
	}
}

func TestPlotMetrics(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "run.jsonl")
	w, err := metrics.Append(path, metrics.Header{Job: "curve-test"})
	if err != nil {
		t.Fatal(err)
	}
	for s := 1; s <= 20; s++ {
		w.Write(metrics.Record{Kind: metrics.KindTrain, Step: s, TotalSteps: 20, Loss: 4 / float64(s)})
		if s%5 == 0 {
			w.Write(metrics.Record{Kind: metrics.KindEval, Step: s, Accuracy: float64(s) / 20, Loss: 3 / float64(s)})
		}
	}
	w.Close()
	out, code := m2ctl(t, "plot", "--metrics", path, "--out", filepath.Join(dir, "plots", "run"))
	if code != 0 {
		t.Fatalf("plot: exit %d: %s", code, out)
	}
	checkImages(t, filepath.Join(dir, "plots", "run"), "curve-test", "accuracy", "loss")

	logPath := filepath.Join(dir, "train.log")
	os.WriteFile(logPath, []byte("step 1/3 [>] loss 5.0\nstep 2/3 [=>] loss 4.0\nstep 3/3 [==] loss 3.5\n"), 0o644)
	if out, code := m2ctl(t, "plot", "--metrics", logPath, "--out", filepath.Join(dir, "log")); code != 0 {
		t.Fatalf("plot of a log: exit %d: %s", code, out)
	}
	checkImages(t, filepath.Join(dir, "log"), "train", "loss")
	if svg, _ := os.ReadFile(filepath.Join(dir, "log.svg")); strings.Contains(string(svg), "accuracy") {
		t.Errorf("a log without evaluations is drawn with an accuracy panel")
	}

	empty := filepath.Join(dir, "empty.log")
	os.WriteFile(empty, []byte("nothing here\n"), 0o644)
	if out, code := m2ctl(t, "plot", "--metrics", empty, "--out", filepath.Join(dir, "e")); code != exitUsage || !strings.Contains(out, "no training or evaluation records") {
		t.Errorf("plot of an empty log: exit %d: %s", code, out)
	}
}

func TestPlotSweepTable(t *testing.T) {
	dir := t.TempDir()
	table := filepath.Join(dir, "results.csv")
	os.WriteFile(table, []byte("name,seq_len,d_model,d_state,accuracy\n"+
		"a,256,64,16,0.2\na,256,128,16,0.35\na,256,64,64,0.5\na,256,128,64,0.8\n"+
		"a,512,64,16,0.1\na,512,128,16,0.2\na,512,64,64,0.3\na,512,128,64,0.6\na,512,128,64,0.1\n"+
		"a,512,64,256,\n"), 0o644) // a second learning rate, and a point not done
	out, code := m2ctl(t, "plot", "sweep", "--table", table, "--out", filepath.Join(dir, "sweep"))
	if code != 0 {
		t.Fatalf("plot sweep: exit %d: %s", code, out)
	}
	checkImages(t, filepath.Join(dir, "sweep"), "sequence length 256", "sequence length 512", "d_state 64", "model dimension")

	os.WriteFile(table, []byte("seq_len,d_model,accuracy\n256,64,0.5\n"), 0o644)
	if out, code := m2ctl(t, "plot", "sweep", "--table", table, "--out", filepath.Join(dir, "x")); code != exitUsage || !strings.Contains(out, `column "d_state"`) {
		t.Errorf("table without d_state: exit %d: %s", code, out)
	}
	os.WriteFile(table, []byte("seq_len,d_model,d_state,accuracy\n256,64,16,1.5\n"), 0o644)
	if out, code := m2ctl(t, "plot", "sweep", "--table", table, "--out", filepath.Join(dir, "x")); code != exitUsage || !strings.Contains(out, "row 2") {
		t.Errorf("table with accuracy 1.5: exit %d: %s", code, out)
	}
}

// tinyGrid is a two-point sweep that trains in well under a second.
var tinyGrid = []string{"--seq-lens", "16", "--d-models", "16", "--d-states", "4,8", "--vocab-size", "32", "--num-pairs", "2",
	"--steps", "3", "--batch", "2", "--headdim", "8", "--chunk-size", "8", "--eval-samples", "16", "--eval-every", "2", "--n-layer", "1", "--lrs", "0.001"}

func readCSV(t *testing.T, path string) []map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	var rows []map[string]string
	for _, rec := range recs[1:] {
		row := map[string]string{}
		for i, name := range recs[0] {
			row[name] = rec[i]
		}
		rows = append(rows, row)
	}
	return rows
}

// TestSweepMQAR runs a tiny grid end to end: specs that the job spec
// accepts, metrics histories, checkpoints whose accuracy under
// `m2ctl eval mqar` is the table's, the tables and the plot; a second run
// skips the finished points, and a sweep in another directory reproduces
// the numbers.
func TestSweepMQAR(t *testing.T) {
	dir := t.TempDir()
	out, code := m2ctl(t, append([]string{"sweep", "mqar", "--out", dir}, tinyGrid...)...)
	if code != 0 {
		t.Fatalf("sweep: exit %d: %s", code, out)
	}
	rows := readCSV(t, filepath.Join(dir, "results.csv"))
	if len(rows) != 2 {
		t.Fatalf("%d result rows, want 2:\n%s", len(rows), out)
	}
	for _, row := range rows {
		name := row["name"]
		doc, err := os.ReadFile(filepath.Join(dir, "specs", name+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		spec, err := jobspec.Parse(doc)
		if err != nil {
			t.Fatalf("%s: the written spec does not parse: %v", name, err)
		}
		if q := spec.Data.MQAR; q == nil || q.VocabSize != 32 || q.NumPairs != 2 || spec.Data.SeqLen != 16 || strconv.Itoa(spec.Model.Config.DState) != row["d_state"] {
			t.Errorf("%s: spec data %+v, model %+v", name, spec.Data, spec.Model.Config)
		}
		h, err := metrics.ReadFile(filepath.Join(dir, "metrics", name+".jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		if len(h.Train) != 3 || h.Train[2].Step != 3 || len(h.Eval) != 2 || h.Eval[0].Step != 2 || h.Eval[1].Step != 3 || h.Header.Labels["d_state"] != row["d_state"] {
			t.Errorf("%s: history of %d train records, evals %+v, labels %v", name, len(h.Train), h.Eval, h.Header.Labels)
		}
		if got := strconv.FormatFloat(h.Train[2].Loss, 'f', 4, 64); got != row["final_loss"] {
			t.Errorf("%s: history's last loss %s, table's %s", name, got, row["final_loss"])
		}
		ev := evalJSON(t, "--checkpoint", filepath.Join(dir, "checkpoints", name), "--spec", filepath.Join(dir, "specs", name+".yaml"), "--samples", "16")
		if strconv.Itoa(ev.Correct) != row["correct"] || strconv.Itoa(ev.Answers) != row["answers"] || ev.Answers != 32 {
			t.Errorf("%s: eval mqar gives %d/%d, the table %s/%s", name, ev.Correct, ev.Answers, row["correct"], row["answers"])
		}
		checkImages(t, filepath.Join(dir, "plots", name), "accuracy")
	}
	checkImages(t, filepath.Join(dir, "sweep"), "sequence length 16", "d_state 4", "d_state 8")
	if md, err := os.ReadFile(filepath.Join(dir, "results.md")); err != nil || strings.Count(string(md), "\n| 16 | 16 |") != 2 {
		t.Errorf("results.md:\n%s", md)
	}

	out, code = m2ctl(t, append([]string{"sweep", "mqar", "--out", dir}, tinyGrid...)...)
	if code != 0 || strings.Count(out, "done before") != 2 {
		t.Errorf("second sweep did not reuse both results: exit %d: %s", code, out)
	}

	other := t.TempDir()
	if out, code := m2ctl(t, append([]string{"sweep", "mqar", "--out", other}, tinyGrid...)...); code != 0 {
		t.Fatalf("sweep: exit %d: %s", code, out)
	}
	for i, row := range readCSV(t, filepath.Join(other, "results.csv")) {
		for _, col := range []string{"name", "final_loss", "eval_loss", "correct"} {
			if row[col] != rows[i][col] {
				t.Errorf("row %d: %s %s in one sweep, %s in another", i, col, rows[i][col], row[col])
			}
		}
	}
}

func TestSweepMQARDryRunAndBadFlags(t *testing.T) {
	dir := t.TempDir()
	out, code := m2ctl(t, "sweep", "mqar", "--out", dir, "--dry-run", "--backend", "cuda")
	if code != 0 || !strings.Contains(out, "36 grid points") {
		t.Fatalf("dry run of the default grid: exit %d: %s", code, out)
	}
	specs, _ := filepath.Glob(filepath.Join(dir, "specs", "*.yaml"))
	if len(specs) != 36 {
		t.Errorf("%d specs written, want 36", len(specs))
	}
	doc, err := os.ReadFile(filepath.Join(dir, "specs", "mqar-l512-d128-n256-lr4e-02.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	spec, err := jobspec.Parse(doc)
	if err != nil {
		t.Fatal(err)
	}
	if c := spec.Model.Config; c.NLayer != 2 || c.DState != 256 || c.DModel != 128 || spec.Data.MQAR.NumPairs != 128 || spec.Backend != "cuda" ||
		spec.Schedule.TotalSteps != 20000 || spec.Schedule.WarmupSteps != 2000 || spec.Optimizer.LR != 0.04 || spec.Batch.GlobalBatch != 64 {
		t.Errorf("default grid's largest point: model %+v, mqar %+v, backend %s, schedule %+v, optimizer %+v, batch %+v",
			c, spec.Data.MQAR, spec.Backend, spec.Schedule, spec.Optimizer, spec.Batch)
	}
	if _, err := os.Stat(filepath.Join(dir, "results.csv")); err == nil {
		t.Errorf("a dry run wrote results")
	}
	for _, tc := range []struct {
		name string
		args []string
		msg  string
	}{
		{"cuda without a CUDA backend", []string{"--backend", "cuda"}, "no CUDA backend"},
		{"bad backend", []string{"--backend", "tpu"}, "--backend"},
		{"repeated d_state", []string{"--d-states", "16,16"}, "--d-states"},
		{"point the spec rejects", []string{"--headdim", "24", "--d-models", "64"}, "model.config.headdim"},
		{"too many pairs", []string{"--num-pairs", "100", "--seq-lens", "256"}, "data.seq_len"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := m2ctlEnv(t, noCUDA, append([]string{"sweep", "mqar", "--out", t.TempDir()}, tc.args...)...)
			if code != exitUsage || !strings.Contains(out, tc.msg) {
				t.Errorf("exit %d, output %q; want exit %d mentioning %q", code, out, exitUsage, tc.msg)
			}
		})
	}
}
