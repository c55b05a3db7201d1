package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/worker/data"
)

func init() { root.AddCommand(newDataCmd()) }

// newDataCmd is the "data" command group: token dataset preparation and
// inspection (docs/dataset-format.md).
func newDataCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "data",
		Short: "Prepare and inspect token datasets",
		Long: `Token datasets are directories of .m2tok shards (a 64-byte header, then
little-endian uint16 or uint32 tokens) with a manifest.json; the format is
specified in docs/dataset-format.md.`,
	}
	cmd.AddCommand(newDataPrepareCmd(), newDataInspectCmd())
	return cmd
}

// dataOutputFlag validates the --output flag value.
func dataOutputFlag(v string) error {
	if v != "text" && v != "json" {
		return usagef("--output: %q, must be text or json", v)
	}
	return nil
}

func newDataPrepareCmd() *cobra.Command {
	var (
		out    string
		output string
		opts   data.PrepareOptions
		exts   []string
	)
	cmd := &cobra.Command{
		Use:   "prepare --out DIR [flags] PATH...",
		Short: "Turn text files into byte-tokenized shards",
		Long: `Reads the files named and the files under the directories named (walked
recursively, hidden entries skipped, kept when their name ends with one of
--ext), in sorted path order, and writes byte-level tokens (one token per byte,
vocabulary 256, or 257 with --eod, which puts an end-of-document token between
files) into DIR as shard-000000.m2tok, ... of --shard-tokens tokens each, plus
manifest.json. Files that are not UTF-8 text, are empty, or are larger than
--max-file-bytes are skipped and counted. The same inputs and flags give
byte-identical output. DIR must not already hold a dataset.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := dataOutputFlag(output); err != nil {
				return err
			}
			if out == "" {
				return usagef("--out: required")
			}
			for _, e := range exts {
				if e = strings.TrimSpace(e); e != "" {
					opts.Extensions = append(opts.Extensions, e)
				}
			}
			ctx := cmd.Context()
			if ctx == nil {
				ctx = context.Background()
			}
			ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
			defer stop()
			st, err := data.Prepare(ctx, args, out, opts)
			if err != nil {
				if errors.Is(err, data.ErrInvalidArgument) || errors.Is(err, data.ErrNoInput) ||
					errors.Is(err, data.ErrOutputExists) || errors.Is(err, fs.ErrNotExist) {
					return usageError{err}
				}
				return err
			}
			return printDataPrepare(cmd.OutOrStdout(), output, out, st)
		},
	}
	f := cmd.Flags()
	f.StringVar(&out, "out", "", "output directory for the shards and manifest.json (required)")
	f.Uint64Var(&opts.ShardTokens, "shard-tokens", data.DefaultShardTokens, "tokens per shard")
	f.StringSliceVar(&exts, "ext", nil, "keep walked files ending with one of these suffixes, e.g. .go,.md (default: all)")
	f.StringVar(&opts.Glob, "glob", "", "keep walked files whose base name matches this pattern, e.g. '*.txt'")
	f.BoolVar(&opts.EOD, "eod", false, "insert the end-of-document token 256 between files (vocabulary 257)")
	f.IntVar(&opts.Width, "width", 2, "token width in bytes: 2 or 4")
	f.Int64Var(&opts.MaxFileBytes, "max-file-bytes", data.DefaultMaxFileBytes, "skip files larger than this")
	f.BoolVar(&opts.IncludeHidden, "include-hidden", false, "also walk files and directories whose names start with '.'")
	f.StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func printDataPrepare(w io.Writer, output, dir string, st data.PrepareStats) error {
	if output == "json" {
		return writeDataJSON(w, st)
	}
	fmt.Fprintf(w, "prepared %s: %d tokens (vocab %d) in %d shards from %d files, %d bytes\n",
		dir, st.Tokens, st.VocabSize, len(st.Shards), st.FilesUsed, st.Bytes)
	fmt.Fprintf(w, "files found %d, skipped: %d not text, %d too large, %d empty\n",
		st.FilesFound, st.SkippedNotText, st.SkippedTooLarge, st.SkippedEmpty)
	return nil
}

func writeDataJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// dataInspectReport is the result of "m2ctl data inspect".
type dataInspectReport struct {
	Path        string            `json:"path"`
	Shards      []dataShardReport `json:"shards"`
	Tokens      uint64            `json:"tokens"`
	VocabSize   uint32            `json:"vocab_size"`
	Verified    bool              `json:"verified"` // every shard's checksum and token range were checked and hold
	FirstTokens []int32           `json:"first_tokens"`
	FirstText   *string           `json:"first_text,omitempty"` // decoded bytes, for byte-level vocabularies
}

type dataShardReport struct {
	Name   string `json:"name"`
	Tokens uint64 `json:"tokens"`
	Width  int    `json:"width"`
	CRC32C string `json:"crc32c"`
	Status string `json:"status"` // "ok", "not verified", or the verification error
}

func newDataInspectCmd() *cobra.Command {
	var (
		output string
		verify bool
		first  int
	)
	cmd := &cobra.Command{
		Use:   "inspect DATASET",
		Short: "Show the shards of a dataset and verify their checksums",
		Long: `Lists the shards of a dataset (a directory, a manifest.json or one .m2tok
file) with their token counts, widths and checksums, verifies every shard
(CRC-32C of the tokens, every token below the vocabulary size) unless
--verify=false, and shows the first tokens, decoded as bytes when the
vocabulary is the byte-level one (256, or 257 with the end-of-document token).
Exits with status 1 if a shard fails verification.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := dataOutputFlag(output); err != nil {
				return err
			}
			if first < 0 {
				return usagef("--first: %d, must be >= 0", first)
			}
			ds, err := data.Open(args[0])
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) || errors.Is(err, data.ErrNoShards) {
					return usageError{err}
				}
				return err
			}
			defer ds.Close()
			ctx := cmd.Context()
			if ctx == nil {
				ctx = context.Background()
			}
			rep, verr := inspectDataset(ctx, args[0], ds, verify, first)
			if rep == nil {
				return verr
			}
			if err := printDataInspect(cmd.OutOrStdout(), output, rep); err != nil {
				return err
			}
			return verr
		},
	}
	f := cmd.Flags()
	f.BoolVar(&verify, "verify", true, "read every token to check checksums and the vocabulary range")
	f.IntVar(&first, "first", 64, "number of leading tokens to show")
	f.StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

// inspectDataset builds the report. A verification failure is reported per
// shard and returned as the error alongside the report; other failures return
// no report.
func inspectDataset(ctx context.Context, path string, ds *data.Dataset, verify bool, first int) (*dataInspectReport, error) {
	rep := &dataInspectReport{Path: path, Tokens: ds.Tokens(), VocabSize: ds.Vocab(), Verified: verify}
	var bad []error
	for _, s := range ds.Shards() {
		h := s.Header()
		sr := dataShardReport{Name: s.Name(), Tokens: h.Count, Width: h.Width, CRC32C: fmt.Sprintf("%08x", h.Checksum), Status: "not verified"}
		if verify {
			if err := s.VerifyContext(ctx); err != nil {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				sr.Status = err.Error()
				rep.Verified = false
				bad = append(bad, err)
			} else {
				sr.Status = "ok"
			}
		}
		rep.Shards = append(rep.Shards, sr)
	}
	rep.FirstTokens = make([]int32, min(uint64(first), ds.Tokens()))
	if err := ds.ReadTokens(rep.FirstTokens, 0); err != nil {
		// A token out of range among the first ones: leave them out; the
		// verification result says what is wrong.
		if !errors.Is(err, data.ErrTokenRange) {
			return nil, err
		}
		rep.FirstTokens = nil
	}
	if v := ds.Vocab(); v == data.ByteVocab || v == data.ByteVocab+1 {
		docs, err := data.ByteTokenizer{EOD: v > data.ByteVocab}.DecodeDocuments(rep.FirstTokens)
		if err == nil {
			parts := make([]string, len(docs))
			for i, d := range docs {
				parts[i] = string(d)
			}
			text := strings.Join(parts, "<|eod|>")
			rep.FirstText = &text
		}
	}
	if len(bad) > 0 {
		return rep, fmt.Errorf("%d of %d shards failed verification: %w", len(bad), len(rep.Shards), errors.Join(bad...))
	}
	return rep, nil
}

func printDataInspect(w io.Writer, output string, rep *dataInspectReport) error {
	if output == "json" {
		return writeDataJSON(w, rep)
	}
	fmt.Fprintf(w, "dataset %s: %d shards, %d tokens, vocab %d\n", rep.Path, len(rep.Shards), rep.Tokens, rep.VocabSize)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SHARD\tTOKENS\tWIDTH\tCRC32C\tSTATUS")
	for _, s := range rep.Shards {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\n", s.Name, s.Tokens, s.Width, s.CRC32C, s.Status)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "first %d tokens: %v\n", len(rep.FirstTokens), rep.FirstTokens)
	if rep.FirstText != nil {
		fmt.Fprintf(w, "decoded: %q\n", *rep.FirstText)
	}
	return nil
}
