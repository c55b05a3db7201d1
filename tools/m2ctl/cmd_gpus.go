package main

import (
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/m2train/m2train/kernels"
	"github.com/m2train/m2train/worker/gpuinfo"
)

func init() { root.AddCommand(newGPUsCmd()) }

func newGPUsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "gpus",
		Short: "List this machine's GPUs, their memory and health, and whether the CUDA kernels load",
		Long: `Lists the GPUs that NVML reports (name, UUID, memory, utilisation,
temperature, ECC and row-remapping health) and whether the CUDA kernel library
(libm2kernels.so: $M2K_LIB, next to the executable, or kernels/build/) loads.
This is what a worker checks before choosing the CUDA backend. Exits 1 when
no GPU is found or a GPU is unhealthy.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			rep, err := gpuinfo.Discover()
			var libState string
			if lib, libErr := kernels.Default(); libErr != nil {
				libState = libErr.Error()
			} else {
				libState = "loads from " + lib.Path()
			}
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				v := struct {
					*gpuinfo.Report
					Error   string `json:"error,omitempty"`
					Kernels string `json:"kernels"`
				}{Report: rep, Kernels: libState}
				if err != nil {
					v.Error = err.Error()
				}
				if e := enc.Encode(v); e != nil {
					return e
				}
			} else {
				if rep != nil {
					fmt.Fprintf(out, "driver %s, CUDA %d.%d\n", rep.DriverVersion, rep.CUDADriverVersion/1000, rep.CUDADriverVersion%1000/10)
					for i := range rep.Devices {
						fmt.Fprintln(out, rep.Devices[i].String())
					}
				}
				fmt.Fprintln(out, "kernels:", libState)
			}
			if err != nil {
				return err
			}
			for i := range rep.Devices {
				if !rep.Devices[i].Healthy() {
					return fmt.Errorf("GPU %d is unhealthy", rep.Devices[i].Index)
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	return cmd
}
