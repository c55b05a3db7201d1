package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/model"
	"github.com/m2train/m2train/model/hf"
	"github.com/m2train/m2train/model/safetensors"
	"github.com/m2train/m2train/worker/checkpoint"
)

func init() { root.AddCommand(newCheckpointCmd()) }

// newCheckpointCmd is the "checkpoint" command group: reading, verifying
// and exporting the checkpoints training writes (docs/checkpoints.md).
func newCheckpointCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "checkpoint",
		Short: "Inspect, verify and export training checkpoints",
		Long: `Training writes a checkpoint of step N to LOCATION/NAME/step-N/ (checkpoint.location
and name of the job spec), local or s3://BUCKET/PREFIX, as config.json,
model.safetensors, optimizer.safetensors, trainer.json and, last, manifest.json
with the size and SHA-256 of every other object (docs/checkpoints.md).

The commands take that directory, LOCATION/NAME, or one step's directory
LOCATION/NAME/step-N, or LOCATION itself when it holds a single job. s3://
locations use the endpoint and credentials of the environment:
M2_S3_ENDPOINT (or AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL), AWS_REGION,
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the credentials file named by
M2_S3_CREDENTIALS_FILE or AWS_SHARED_CREDENTIALS_FILE (~/.aws/credentials).`,
	}
	cmd.AddCommand(newCheckpointInspectCmd(), newCheckpointExportCmd())
	return cmd
}

// stepDirName matches the name of one step's directory.
var stepDirName = regexp.MustCompile(`^step-[0-9]{8,}$`)

// ckptLocation is an opened checkpoint location.
type ckptLocation struct {
	store  checkpoint.Store
	prefix string // the key prefix of the job's step-N directories
	name   string // the location as shown to the user
	steps  []int  // committed steps, newest first
	pinned int    // the step of a .../step-N location, else -1
}

func (l *ckptLocation) Close() {
	if c, ok := l.store.(io.Closer); ok {
		c.Close()
	}
}

// stepName is how a step's directory is shown to the user.
func (l *ckptLocation) stepName(step int) string {
	return strings.TrimSuffix(l.name, "/") + "/" + checkpoint.StepDir(step)
}

// openCheckpointLocation opens the store of location and finds the job
// directory in it that holds committed checkpoints (see the group's help).
func openCheckpointLocation(ctx context.Context, location string, log *slog.Logger) (*ckptLocation, error) {
	loc := &ckptLocation{pinned: -1}
	trimmed := strings.TrimRight(location, "/")
	if i := strings.LastIndex(trimmed, "/"); i >= 0 && stepDirName.MatchString(trimmed[i+1:]) {
		loc.pinned, _ = strconv.Atoi(strings.TrimPrefix(trimmed[i+1:], "step-"))
		trimmed = trimmed[:i]
	}
	if trimmed == "" {
		return nil, usagef("LOCATION: must not be empty")
	}
	store, prefix, err := checkpoint.OpenStore(ctx, trimmed, checkpoint.OpenOptions{Log: log})
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) || ctx.Err() != nil {
			return nil, err
		}
		return nil, usageError{err}
	}
	loc.store, loc.prefix, loc.name = store, prefix, trimmed
	if ls, ok := store.(checkpoint.LocalStore); ok {
		loc.name = ls.Root
	}
	if loc.steps, err = checkpoint.Steps(ctx, store, prefix); err != nil {
		loc.Close()
		return nil, err
	}
	if len(loc.steps) == 0 && loc.pinned < 0 {
		// LOCATION itself rather than LOCATION/NAME: take its one job.
		jobs, err := jobsUnder(ctx, store, prefix)
		if err != nil {
			loc.Close()
			return nil, err
		}
		switch len(jobs) {
		case 0:
		case 1:
			loc.prefix, loc.name = checkpoint.JoinKey(prefix, jobs[0]), loc.name+"/"+jobs[0]
			if loc.steps, err = checkpoint.Steps(ctx, store, loc.prefix); err != nil {
				loc.Close()
				return nil, err
			}
		default:
			loc.Close()
			return nil, usagef("%s holds the checkpoints of %d jobs (%s): name one as LOCATION/NAME", loc.name, len(jobs), strings.Join(jobs, ", "))
		}
	}
	if len(loc.steps) == 0 {
		loc.Close()
		return nil, usagef("%s: no committed checkpoint (no step-N/%s)", loc.name, checkpoint.ManifestObject)
	}
	return loc, nil
}

// jobsUnder returns the names NAME of the directories prefix/NAME that
// hold committed checkpoints, sorted.
func jobsUnder(ctx context.Context, store checkpoint.Store, prefix string) ([]string, error) {
	base := checkpoint.JoinKey(prefix, "")
	if prefix == "" {
		base = ""
	}
	names, err := store.List(ctx, base)
	if err != nil {
		return nil, err
	}
	var jobs []string
	for _, n := range names {
		parts := strings.Split(strings.TrimPrefix(n, base), "/")
		if len(parts) == 3 && parts[0] != "" && stepDirName.MatchString(parts[1]) && parts[2] == checkpoint.ManifestObject && !slices.Contains(jobs, parts[0]) {
			jobs = append(jobs, parts[0])
		}
	}
	slices.Sort(jobs)
	return jobs, nil
}

// openCheckpointStep opens location and chooses the step to read with
// chooseStep(step); the caller closes the location when there is no error.
func openCheckpointStep(ctx context.Context, location string, step int, log *slog.Logger) (*ckptLocation, int, error) {
	loc, err := openCheckpointLocation(ctx, location, log)
	if err != nil {
		return nil, 0, err
	}
	s, err := loc.chooseStep(step)
	if err != nil {
		loc.Close()
		return nil, 0, err
	}
	return loc, s, nil
}

// chooseStep returns the step to read: --step when given (-1: not given),
// else the step of a .../step-N location, else the newest.
func (l *ckptLocation) chooseStep(flag int) (int, error) {
	step := l.steps[0]
	switch {
	case flag >= 0 && l.pinned >= 0 && flag != l.pinned:
		return 0, usagef("--step %d: the location names step %d", flag, l.pinned)
	case flag >= 0:
		step = flag
	case l.pinned >= 0:
		step = l.pinned
	}
	if !slices.Contains(l.steps, step) {
		return 0, usagef("%s: no committed checkpoint of step %d; committed steps: %s", l.name, step, joinInts(l.steps))
	}
	return step, nil
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ", ")
}

// Verification outcomes of one object.
const (
	objOK       = "OK"
	objMismatch = "MISMATCH"
	objMissing  = "MISSING"
)

// objectReport is one object of a checkpoint and how it verified.
type objectReport struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
	Status string `json:"status"` // OK, MISMATCH or MISSING
	Detail string `json:"detail,omitempty"`
}

// requiredObjects are the objects every checkpoint's manifest must list.
var requiredObjects = []string{checkpoint.ConfigObject, checkpoint.ModelObject, checkpoint.OptimizerObject, checkpoint.TrainerObject}

// verifyStep reads every object the manifest of step lists, hashing it as
// it streams, and reports each as OK, MISMATCH (size or SHA-256 differ
// from the manifest) or MISSING (absent from the store, or a required
// object the manifest does not list). It returns the bytes of the objects
// keep names that verified, and the names in the step's directory that
// the manifest does not list. Its error is a store failure or a manifest
// that cannot be read; a failed verification is not an error.
func verifyStep(ctx context.Context, store checkpoint.Store, prefix string, step int, keep ...string) (*checkpoint.Manifest, []objectReport, map[string][]byte, []string, error) {
	man, err := checkpoint.ReadManifest(ctx, store, prefix, step)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	dir := checkpoint.JoinKey(prefix, checkpoint.StepDir(step))
	kept := map[string][]byte{}
	var reps []objectReport
	for _, o := range man.Objects {
		rep := objectReport{Name: o.Name, Size: o.Size, SHA256: o.SHA256}
		r, err := store.Open(ctx, checkpoint.JoinKey(dir, o.Name))
		if errors.Is(err, checkpoint.ErrNotFound) {
			rep.Status, rep.Detail = objMissing, "not in the store"
			reps = append(reps, rep)
			continue
		}
		if err != nil {
			return nil, nil, nil, nil, fmt.Errorf("%s: %w", o.Name, err)
		}
		h := sha256.New()
		var buf *bytes.Buffer
		w := io.Writer(h)
		if slices.Contains(keep, o.Name) && o.Size <= math.MaxInt32 {
			buf = bytes.NewBuffer(make([]byte, 0, o.Size))
			w = io.MultiWriter(h, buf)
		}
		n, err := io.Copy(w, r)
		r.Close()
		if err != nil {
			return nil, nil, nil, nil, fmt.Errorf("read %s: %w", o.Name, err)
		}
		sum := hex.EncodeToString(h.Sum(nil))
		switch {
		case n != o.Size:
			rep.Status, rep.Detail = objMismatch, fmt.Sprintf("%d bytes, the manifest says %d", n, o.Size)
		case sum != o.SHA256:
			rep.Status, rep.Detail = objMismatch, fmt.Sprintf("sha256 %s, the manifest says %s", sum, o.SHA256)
		default:
			rep.Status = objOK
			if buf != nil {
				kept[o.Name] = buf.Bytes()
			}
		}
		reps = append(reps, rep)
	}
	for _, name := range requiredObjects {
		if !slices.ContainsFunc(man.Objects, func(o checkpoint.Object) bool { return o.Name == name }) {
			reps = append(reps, objectReport{Name: name, Status: objMissing, Detail: "the manifest does not list it"})
		}
	}
	names, err := store.List(ctx, dir+"/")
	if err != nil {
		return nil, nil, nil, nil, err
	}
	var unlisted []string
	for _, n := range names {
		base := strings.TrimPrefix(n, dir+"/")
		if base != checkpoint.ManifestObject && !slices.ContainsFunc(man.Objects, func(o checkpoint.Object) bool { return o.Name == base }) {
			unlisted = append(unlisted, base)
		}
	}
	return man, reps, kept, unlisted, nil
}

// failedObjects counts the reports that are not OK.
func failedObjects(reps []objectReport) int {
	n := 0
	for _, r := range reps {
		if r.Status != objOK {
			n++
		}
	}
	return n
}

// trainerSummary is the part of trainer.json that inspect shows.
type trainerSummary struct {
	Job           string  `json:"job,omitempty"`
	Step          int     `json:"step"`
	Cursor        uint64  `json:"cursor"`
	Seed          uint64  `json:"seed"`
	OptimizerStep int64   `json:"optimizer_step"`
	Loss          float64 `json:"loss"`
	Precision     string  `json:"precision"`
}

// modelSummary is the architecture of config.json.
type modelSummary struct {
	DModel     int `json:"d_model"`
	NLayer     int `json:"n_layer"`
	VocabSize  int `json:"vocab_size"`
	DState     int `json:"d_state"`
	NHeads     int `json:"n_heads"`
	HeadDim    int `json:"head_dim"`
	NGroups    int `json:"n_groups"`
	Parameters int `json:"parameters"`
}

// ckptInspectReport is what `checkpoint inspect` prints.
type ckptInspectReport struct {
	Location string          `json:"location"`
	Steps    []int           `json:"steps"`
	Step     int             `json:"step"`
	Dir      string          `json:"dir"`
	Format   string          `json:"format"`
	Size     int64           `json:"size"`
	Objects  []objectReport  `json:"objects"`
	Unlisted []string        `json:"unlisted,omitempty"`
	Trainer  *trainerSummary `json:"trainer,omitempty"`
	Model    *modelSummary   `json:"model,omitempty"`
	Verified bool            `json:"verified"`
	Problems []string        `json:"problems,omitempty"`
}

func newCheckpointInspectCmd() *cobra.Command {
	var (
		step   int
		output string
	)
	cmd := &cobra.Command{
		Use:   "inspect LOCATION [--step N]",
		Short: "List a job's checkpoints and verify one of them",
		Long: `Lists the committed steps under LOCATION (newest first), then for the newest
one, or --step N, prints its manifest (every object with its size and SHA-256),
the trainer state (step, data cursor, seed, optimizer step, loss, precision) and
the model's architecture, and verifies every object: each is read in full,
hashed and reported OK, MISMATCH (size or SHA-256 differ from the manifest) or
MISSING. Exits with status 1 if any object fails, 2 if LOCATION holds no
committed checkpoint or not the step asked for.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "text" && output != "json" {
				return usagef("--output: %q, must be text or json", output)
			}
			ctx, log := commandContext(cmd)
			loc, s, err := openCheckpointStep(ctx, args[0], step, log)
			if err != nil {
				return err
			}
			defer loc.Close()
			rep, err := inspectCheckpoint(ctx, loc, s)
			if err != nil {
				return err
			}
			if err := printCheckpointInspect(cmd.OutOrStdout(), output, rep); err != nil {
				return err
			}
			if !rep.Verified {
				msg := fmt.Sprintf("%s does not verify: %s", rep.Dir, strings.Join(rep.Problems, "; "))
				if i := slices.Index(loc.steps, s); i+1 < len(loc.steps) {
					msg += fmt.Sprintf(" (resume falls back to an older checkpoint; inspect step %d with --step %d)", loc.steps[i+1], loc.steps[i+1])
				}
				return errors.New(msg)
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&step, "step", -1, "the step to verify (default: the newest)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

// commandContext returns the command's context (Background when it has
// none) and a logger for the store's retries and warnings, on stderr.
func commandContext(cmd *cobra.Command) (context.Context, *slog.Logger) {
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	return ctx, slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// inspectCheckpoint verifies step and summarises it. A manifest that does
// not parse is reported, not returned as an error.
func inspectCheckpoint(ctx context.Context, loc *ckptLocation, step int) (*ckptInspectReport, error) {
	rep := &ckptInspectReport{Location: loc.name, Steps: loc.steps, Step: step, Dir: loc.stepName(step)}
	man, objs, kept, unlisted, err := verifyStep(ctx, loc.store, loc.prefix, step, checkpoint.ConfigObject, checkpoint.TrainerObject)
	if errors.Is(err, checkpoint.ErrCorrupt) {
		rep.Problems = append(rep.Problems, "manifest: "+err.Error())
		return rep, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", rep.Dir, err)
	}
	rep.Format, rep.Size, rep.Objects, rep.Unlisted = man.Format, man.Size(), objs, unlisted
	for _, o := range objs {
		if o.Status != objOK {
			rep.Problems = append(rep.Problems, fmt.Sprintf("%s %s (%s)", o.Name, o.Status, o.Detail))
		}
	}
	if b, ok := kept[checkpoint.TrainerObject]; ok {
		var ts checkpoint.TrainerState
		if err := json.Unmarshal(b, &ts); err != nil {
			rep.Problems = append(rep.Problems, fmt.Sprintf("%s: %v", checkpoint.TrainerObject, err))
		} else {
			var spec struct {
				Name string `json:"name"`
			}
			_ = json.Unmarshal(ts.Spec, &spec)
			rep.Trainer = &trainerSummary{Job: spec.Name, Step: ts.Step, Cursor: ts.Cursor, Seed: ts.Seed,
				OptimizerStep: ts.OptimizerStep, Loss: ts.Loss, Precision: ts.Precision}
			if ts.Step != step {
				rep.Problems = append(rep.Problems, fmt.Sprintf("%s: step %d in the checkpoint of step %d", checkpoint.TrainerObject, ts.Step, step))
			}
		}
	}
	if b, ok := kept[checkpoint.ConfigObject]; ok {
		cfg, _, err := hf.ParseConfig(b)
		if err != nil {
			rep.Problems = append(rep.Problems, fmt.Sprintf("%s: %v", checkpoint.ConfigObject, err))
		} else {
			rep.Model = &modelSummary{DModel: cfg.DModel, NLayer: cfg.NLayer, VocabSize: cfg.VocabSize, DState: cfg.DState,
				NHeads: cfg.NHeads, HeadDim: cfg.HeadDim, NGroups: cfg.NGroups, Parameters: model.NewLayout(cfg).Total}
		}
	}
	rep.Verified = len(rep.Problems) == 0
	return rep, nil
}

func printCheckpointInspect(w io.Writer, output string, rep *ckptInspectReport) error {
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	fmt.Fprintf(w, "checkpoints in %s: step %s (newest first)\n", rep.Location, joinInts(rep.Steps))
	if rep.Objects == nil {
		fmt.Fprintf(w, "%s: %s\n", rep.Dir, strings.Join(rep.Problems, "; "))
		return nil
	}
	fmt.Fprintf(w, "\n%s: manifest %s, step %d, %d objects, %d bytes\n", rep.Dir, rep.Format, rep.Step, len(rep.Objects), rep.Size)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "OBJECT\tSIZE\tSHA-256\tCHECK")
	for _, o := range rep.Objects {
		status := o.Status
		if o.Detail != "" {
			status += ": " + o.Detail
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", o.Name, o.Size, o.SHA256, status)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, n := range rep.Unlisted {
		fmt.Fprintf(w, "not in the manifest, ignored: %s\n", n)
	}
	if t := rep.Trainer; t != nil {
		job := ""
		if t.Job != "" {
			job = "job " + t.Job + ", "
		}
		fmt.Fprintf(w, "trainer: %sstep %d, data cursor %d, seed %d, optimizer step %d, loss %.6g, precision %s\n",
			job, t.Step, t.Cursor, t.Seed, t.OptimizerStep, t.Loss, t.Precision)
	}
	if m := rep.Model; m != nil {
		fmt.Fprintf(w, "model: Mamba-2, d_model %d, %d layers, vocab %d, d_state %d, %d heads × %d, %d groups; %d parameters\n",
			m.DModel, m.NLayer, m.VocabSize, m.DState, m.NHeads, m.HeadDim, m.NGroups, m.Parameters)
	}
	ok := 0
	for _, o := range rep.Objects {
		if o.Status == objOK {
			ok++
		}
	}
	verdict := "verified"
	if !rep.Verified {
		verdict = "FAILED"
	}
	fmt.Fprintf(w, "%s: %d of %d objects OK\n", verdict, ok, len(rep.Objects))
	return nil
}

// exportDTypes are the weight dtypes export writes.
var exportDTypes = map[string]safetensors.DType{"float32": safetensors.F32, "bfloat16": safetensors.BF16}

func newCheckpointExportCmd() *cobra.Command {
	var (
		step  int
		dtype string
		force bool
	)
	cmd := &cobra.Command{
		Use:   "export LOCATION OUTDIR [--step N] [--dtype float32|bfloat16]",
		Short: "Write a checkpoint's model as a Hugging Face directory",
		Long: `Verifies every object of the newest checkpoint under LOCATION (or --step N) as
inspect does, and writes its model to OUTDIR as config.json + model.safetensors
in --dtype (float32, or bfloat16 rounded to nearest even from the stored
weights), which transformers' Mamba2ForCausalLM.from_pretrained(OUTDIR) loads.
The written files are read back and compared with the checkpoint's weights.
OUTDIR must be empty or absent unless --force, which replaces config.json and
model.safetensors in it and leaves other files alone. Exits with status 1 if
the checkpoint does not verify, 2 for bad arguments or a non-empty OUTDIR.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			dt, ok := exportDTypes[dtype]
			if !ok {
				return usagef("--dtype: %q, must be float32 or bfloat16", dtype)
			}
			outDir := args[1]
			if err := checkExportDir(outDir, force); err != nil {
				return err
			}
			ctx, log := commandContext(cmd)
			loc, s, err := openCheckpointStep(ctx, args[0], step, log)
			if err != nil {
				return err
			}
			defer loc.Close()
			return exportCheckpoint(ctx, cmd.OutOrStdout(), loc, s, outDir, dt, dtype)
		},
	}
	cmd.Flags().IntVar(&step, "step", -1, "the step to export (default: the newest)")
	cmd.Flags().StringVar(&dtype, "dtype", "float32", "weight dtype: float32 or bfloat16")
	cmd.Flags().BoolVar(&force, "force", false, "write into a non-empty OUTDIR, replacing config.json and model.safetensors")
	return cmd
}

// checkExportDir refuses an OUTDIR that is a file, or a non-empty
// directory without force.
func checkExportDir(dir string, force bool) error {
	st, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return usageError{err}
	}
	if !st.IsDir() {
		return usagef("OUTDIR %s: exists and is not a directory", dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return usageError{err}
	}
	if len(entries) > 0 && !force {
		return usagef("OUTDIR %s: is not empty (%d entries); use --force to replace %s and %s in it", dir, len(entries), hf.ConfigFile, hf.WeightsFile)
	}
	return nil
}

// exportCheckpoint verifies step and writes its model to outDir.
func exportCheckpoint(ctx context.Context, w io.Writer, loc *ckptLocation, step int, outDir string, dt safetensors.DType, dtName string) error {
	dir := loc.stepName(step)
	_, objs, kept, _, err := verifyStep(ctx, loc.store, loc.prefix, step, checkpoint.ConfigObject, checkpoint.ModelObject)
	if err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	if n := failedObjects(objs); n > 0 {
		var bad []string
		for _, o := range objs {
			if o.Status != objOK {
				bad = append(bad, fmt.Sprintf("%s %s (%s)", o.Name, o.Status, o.Detail))
			}
		}
		msg := fmt.Sprintf("%s does not verify, nothing exported: %s", dir, strings.Join(bad, "; "))
		if i := slices.Index(loc.steps, step); i+1 < len(loc.steps) {
			msg += fmt.Sprintf(" (the previous checkpoint is step %d: --step %d)", loc.steps[i+1], loc.steps[i+1])
		}
		return errors.New(msg)
	}
	cfg, _, err := hf.ParseConfig(kept[checkpoint.ConfigObject])
	if err != nil {
		return fmt.Errorf("%s: %s: %w", dir, checkpoint.ConfigObject, err)
	}
	layout := model.NewLayout(cfg)
	mf, err := safetensors.Read(kept[checkpoint.ModelObject])
	if err != nil {
		return fmt.Errorf("%s: %s: %w", dir, checkpoint.ModelObject, err)
	}
	// float64 holds every stored dtype exactly, so bfloat16 is rounded once,
	// from the stored value.
	params, err := hf.LoadParamsFromFile[float64](mf, cfg, layout)
	if err != nil {
		return fmt.Errorf("%s: %s: %w", dir, checkpoint.ModelObject, err)
	}
	stored := "?"
	if len(layout.Tensors) > 0 {
		if t, ok := mf.Get(layout.Tensors[0].Name); ok {
			stored = string(t.DType)
		}
	}
	if err := hf.SaveCheckpoint(outDir, cfg, layout, params, dt); err != nil {
		return err
	}
	if err := checkExport(outDir, cfg, layout, params, dt); err != nil {
		return fmt.Errorf("export to %s: read back: %w", outDir, err)
	}
	st, err := os.Stat(filepath.Join(outDir, hf.WeightsFile))
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "exported step %d of %s (weights stored as %s) to %s: %s + %s, %s, %d parameters, %d bytes of weights\n",
		step, loc.name, stored, outDir, hf.ConfigFile, hf.WeightsFile, dtName, layout.Total, st.Size())
	fmt.Fprintf(w, "load it with: Mamba2ForCausalLM.from_pretrained(%q)\n", outDir)
	return nil
}

// checkExport reads the written directory back and checks that its
// configuration is cfg and every weight is the stored one rounded to dt.
func checkExport(dir string, cfg model.Config, layout *model.Layout, params []float64, dt safetensors.DType) error {
	got, _, err := hf.ReadConfigFile(filepath.Join(dir, hf.ConfigFile))
	if err != nil {
		return err
	}
	if model.NewLayout(got).Total != layout.Total || got.DModel != cfg.DModel || got.NLayer != cfg.NLayer || got.VocabSize != cfg.VocabSize {
		return fmt.Errorf("%s describes another model than the checkpoint's", hf.ConfigFile)
	}
	back, err := hf.LoadParams[float64](dir, got, layout)
	if err != nil {
		return err
	}
	for i, v := range params {
		want := float64(float32(v))
		if dt == safetensors.BF16 {
			want = float64(safetensors.Float32FromBF16(safetensors.BF16FromFloat64(v)))
		}
		if math.Float64bits(back[i]) != math.Float64bits(want) && !(math.IsNaN(back[i]) && math.IsNaN(want)) {
			return fmt.Errorf("parameter %d is %v, want %v", i, back[i], want)
		}
	}
	return nil
}
