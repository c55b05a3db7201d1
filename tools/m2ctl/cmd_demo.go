package main

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/coordinator/jobspec"
	"github.com/m2train/m2train/worker/checkpoint"
	"github.com/m2train/m2train/worker/checkpoint/s3gw"
	"github.com/m2train/m2train/worker/data"
)

func init() { root.AddCommand(newDemoCmd()) }

// demoSources are the packages of the Go distribution whose sources make
// the demo corpus: text every machine with Go has.
var demoSources = []string{"fmt", "strings", "strconv", "sort", "bytes", "bufio", "errors", "unicode", "container", "math"}

// The demo's bucket and checkpoint location in its own gateway.
const (
	demoBucket   = "demo"
	demoLocation = "s3://" + demoBucket + "/checkpoints"
)

const demoSpec = `# The demo job: a small byte-level Mamba-2 trained on Go source code.
name: demo
model:
  config:
    d_model: 128
    n_layer: 2
    vocab_size: 272      # 256 bytes + end-of-document, padded to a multiple of 16
    d_state: 32
    headdim: 32
    expand: 2
    chunk_size: 64
data:
  path: %s
  seq_len: 256
parallel: {dp: 1, sp: 1}
batch: {micro_batch: 8, global_batch: 8}
optimizer: {lr: 0.003, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, grad_clip: 1.0}
schedule: {warmup_steps: 20, total_steps: %d, min_lr: 0.0003}
precision: float32
# The demo serves s3://demo from its own S3 gateway while it trains; to train
# this spec elsewhere, point M2_S3_ENDPOINT and the AWS_* credentials at an
# S3 server with a bucket named demo, or make the location a local path.
checkpoint: {location: %s, every_steps: 100, keep: 2}
seed: 1
backend: cpu
`

func newDemoCmd() *cobra.Command {
	var dir string
	var steps int
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Train a small byte-level Mamba-2 on the Go distribution's own sources",
		Long: `Prepares a byte-level token dataset from the Go standard library's sources on
this machine, writes a job spec, and trains a small Mamba-2 on the CPU backend,
showing the loss fall from the uniform-guess loss ln(vocab). Checkpoints go to
s3://demo/checkpoints/demo/ through an S3 gateway (the Versity gateway) that
the demo runs in this process on DIR/s3, where each object is a plain file;
the demo ends by printing how to inspect and export them. Running it again
resumes from the newest checkpoint.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if steps <= 20 {
				return usagef("--steps: must be more than the 20 warmup steps, got %d", steps)
			}
			// The in-process gateway changes the working directory, so
			// every path is made absolute first.
			dir, err := filepath.Abs(dir)
			if err != nil {
				return usageError{err}
			}
			out := cmd.ErrOrStderr()
			ctx := cmd.Context()
			if ctx == nil {
				ctx = context.Background()
			}
			goroot := goRoot()
			var inputs []string
			for _, p := range demoSources {
				inputs = append(inputs, filepath.Join(goroot, "src", p))
			}
			dataDir := filepath.Join(dir, "data")
			if _, err := os.Stat(filepath.Join(dataDir, data.ManifestName)); err != nil {
				fmt.Fprintf(out, "preparing byte-level shards from %s/src/{%s} ...\n", goroot, strings.Join(demoSources, ","))
				st, err := data.Prepare(ctx, inputs, dataDir, data.PrepareOptions{Extensions: []string{".go"}, EOD: true})
				if err != nil {
					return err
				}
				fmt.Fprintf(out, "prepared %d files, %d tokens\n", st.FilesUsed, st.Tokens)
			}
			specPath := filepath.Join(dir, "demo.yaml")
			doc := fmt.Sprintf(demoSpec, dataDir, steps, demoLocation)
			if err := os.WriteFile(specPath, []byte(doc), 0o644); err != nil {
				return err
			}
			spec, err := jobspec.Parse([]byte(doc))
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "job spec: %s\n", specPath)
			gwDir := filepath.Join(dir, "s3")
			gw, err := s3gw.Start(ctx, s3gw.Options{Dir: gwDir, Buckets: []string{demoBucket}})
			if err != nil {
				return fmt.Errorf("start the demo's S3 gateway on %s: %w", gwDir, err)
			}
			defer gw.Stop()
			fmt.Fprintf(out, "S3 gateway: %s serves the buckets in %s; checkpoints go to %s/%s/\n", gw.Endpoint, gwDir, demoLocation, spec.Name)
			s3cfg := &checkpoint.S3Config{Endpoint: gw.Endpoint, Region: gw.Region, AccessKey: gw.AccessKey, SecretKey: gw.SecretKey}
			res, err := runTraining(ctx, spec, trainOptions{Resume: true, S3: s3cfg}, out)
			if err != nil {
				return err
			}
			if err := gw.Stop(); err != nil {
				return fmt.Errorf("stop the demo's S3 gateway: %w", err)
			}
			uniform := math.Log(float64(spec.Model.Config.VocabSize))
			fmt.Fprintf(out, "\nfinal loss %.4f after %d steps; a uniform guess over %d tokens scores ln(%d) = %.4f\n",
				res.FinalLoss, res.Steps, spec.Model.Config.VocabSize, spec.Model.Config.VocabSize, uniform)
			if res.Checkpoint != "" {
				// The gateway keeps each object as a plain file under its
				// directory, so the local commands read them once it is gone.
				local := filepath.Join(gwDir, demoBucket, filepath.FromSlash(strings.TrimPrefix(demoLocation, "s3://"+demoBucket+"/")), spec.Name)
				fmt.Fprintf(out, "checkpoint: %s (a Hugging Face Mamba2ForCausalLM directory)\n", res.Checkpoint)
				fmt.Fprintf(out, "  the gateway stored it as files in %s\n", filepath.Join(local, path.Base(res.Checkpoint)))
				fmt.Fprintf(out, "  inspect and verify:     m2ctl checkpoint inspect %s\n", local)
				fmt.Fprintf(out, "  export for transformers: m2ctl checkpoint export %s %s --dtype bfloat16\n", local, filepath.Join(dir, "hf"))
			}
			if !(res.FinalLoss < uniform) {
				return fmt.Errorf("the loss did not fall below the uniform-guess loss")
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", filepath.Join(os.TempDir(), "m2train-demo"), "working directory for data, spec and checkpoints")
	cmd.Flags().IntVar(&steps, "steps", 300, "optimizer steps")
	return cmd
}

// goRoot finds the Go distribution: `go env GOROOT`, else the one this
// binary was built with.
func goRoot() string {
	if out, err := exec.Command("go", "env", "GOROOT").Output(); err == nil {
		if s := strings.TrimSpace(string(out)); s != "" {
			return s
		}
	}
	return runtime.GOROOT()
}
