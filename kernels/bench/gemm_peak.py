"""Measures the bf16 matrix-product rate this GPU reaches through PyTorch
(cuBLAS), the ceiling our TFLOP/s figures are compared with.

    python3 kernels/bench/gemm_peak.py [--size 8192] [--json gemm.json]

C = A·B with A, B of size x size in bf16 and f32 accumulation, rotating over
three input pairs of random values (each 128 MiB at 8192, so none stays in
the 50 MiB L2); CUDA events around each product, the median of --reps after
--warmup products.
"""
import argparse
import json
import statistics

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.size < 1 or a.warmup < 0 or a.reps < 1:
        raise SystemExit("gemm_peak.py: --size and --reps must be at least 1, --warmup at least 0")

    torch.manual_seed(0)
    n = a.size
    pairs = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
              torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for i in range(a.warmup):
        torch.matmul(*pairs[i % 3], out=out)
    torch.cuda.synchronize()
    times = []
    for i in range(a.reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(*pairs[i % 3], out=out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    tflops = 2 * n ** 3 / (ms / 1e3) / 1e12
    print(f"bf16 GEMM {n}x{n}x{n} ({torch.cuda.get_device_name()}, torch {torch.__version__}): "
          f"{ms:.3f} ms, {tflops:.1f} TFLOP/s (median of {a.reps})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(tool="gemm_peak", device=torch.cuda.get_device_name(), torch=torch.__version__,
                           size=n, reps=a.reps, ms=ms, tflops=tflops), f, indent=1)


if __name__ == "__main__":
    main()
