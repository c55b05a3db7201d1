"""The PyTorch reference of tools/distbench on GPUs: data-parallel training of
mamba_ssm's Mamba-2 language model (the model and optimizer recipe of
bench_step.py) with torch.nn.parallel.DistributedDataParallel over NCCL, one
process per GPU, for each world size in turn; and the table that sets
distbench's results beside it.

    python3 kernels/bench/bench_ddp.py --mamba .mamba_ref --world-sizes 1,2,4,8 --json ddp.json
    python3 kernels/bench/bench_ddp.py --table --ours distbench.json --theirs ddp.json [--out multigpu.md]

A step is the published recipe's global batch, 256 sequences of 2,048 tokens
(524,288 tokens), split evenly over the ranks and reached on each rank by
gradient accumulation over micro-batches of --batch sequences. Every
micro-batch but the last runs its backward under DDP's no_sync(), so the
gradients are all-reduced once per step, bucket by bucket while the last
backward runs; then clip_grad_norm_ and fused AdamW, as in bench_step.py
(fp32 parameters, torch.autocast bf16). Tokens are uniform random, drawn once
per rank from a generator seeded with (--seed, rank) and reused every step.

The script starts the ranks itself (torch.multiprocessing, spawn; rendezvous
on 127.0.0.1 at a free port), one world size after another, and forces
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 (NVLink multicast off) in itself and in every rank.

Timing, per rank: CUDA events at the start of the step, before the last
micro-batch, after its backward (the all-reduce included: DDP makes the
stream wait for it), after the clipping and after the optimizer step, and
the host clock around the step; the host waits for the step's end before the
next. A step's time is the largest over the ranks; the figure is the median
over the timed steps after the warm-up (whose first step compiles and
autotunes the Triton kernels). Efficiency is tokens/s over world size times
the tokens/s of world size 1 in the same run. Memory, per rank: torch.cuda's
peak allocated bytes over the timed steps, and the device's total − free
memory (NCCL's buffers included) sampled after the first backward and after
every step.

The JSON (--json, rewritten after each world size) holds the run's settings
and "layouts": one object per world size with layout ("dpN×sp1"), dp, sp,
ranks, step_s, tokens_per_s, speedup and efficiency among its fields; world
sizes that failed or were skipped are in "failed" with their reason.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import re
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import bench_step  # noqa: E402  the model, its import from the sources and the optimizer's groups

GIB = bench_step.GIB

# NVLink multicast stays off: forced, not defaulted, in the launcher and in
# every rank.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def force_env():
    for k, v in NO_MULTICAST.items():
        os.environ[k] = v


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout_name(dp, sp=1):
    return f"dp{dp}×sp{sp}"


# ---------------------------------------------------------------------------
# One rank (a spawned process).


def rank_main(rank, world, port, a, outdir):
    """The entry point of a spawned rank: trains, then writes its
    measurements to outdir/rank<rank>.json. An exception ends the process
    with its traceback, which the launcher prints."""
    force_env()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        res = train_rank(rank, world, a)
    except SystemExit as e:  # bench_step exits on missing sources or packages; make it a traceback
        raise RuntimeError(f"rank {rank} of {world}: {e}") from None
    path = os.path.join(outdir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(path + ".tmp", path)


def train_rank(rank, world, a):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    import triton

    torch.cuda.set_device(rank)  # before anything else touches CUDA, so that the context is on this rank's GPU
    dev = torch.device("cuda", rank)
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info(dev)
    used_open = total - free
    dist.init_process_group("nccl", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=a.nccl_timeout))

    notes = []
    model = bench_step.build_model(a, dev, notes)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.lm_head.weight.shape[0]
    opt = torch.optim.AdamW(bench_step.param_groups(model, 0.1), lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    ddp = DDP(model, device_ids=[rank], output_device=rank, bucket_cap_mb=a.bucket_mb)

    k_micro = a.global_batch // (a.batch * world)
    g = torch.Generator(device=dev)
    g.manual_seed(a.seed * 1_000_003 + rank)
    tokens = torch.randint(0, vocab, (k_micro * a.batch, a.seq_len + 1), device=dev, generator=g)
    micro = [(tokens[k * a.batch:(k + 1) * a.batch, :-1].contiguous(),
              tokens[k * a.batch:(k + 1) * a.batch, 1:].contiguous()) for k in range(k_micro)]
    del tokens
    clip = a.max_grad_norm if a.max_grad_norm > 0 else math.inf  # inf: the norm is computed, nothing is scaled
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
    peak_used = used_open

    def sample():
        nonlocal peak_used
        f, t = torch.cuda.mem_get_info(dev)
        peak_used = max(peak_used, t - f)

    def step(first):
        t0 = time.perf_counter()
        ev[0].record()
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for k, (x, y) in enumerate(micro):
            last = k == k_micro - 1
            if last:
                ev[1].record()
            # Gradients accumulate locally; the last backward all-reduces them.
            with contextlib.nullcontext() if last else ddp.no_sync():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = ddp(x).logits
                    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
                (loss / k_micro).backward()
            loss_sum += loss.detach()
            del logits, loss
        ev[2].record()
        if first:
            sample()
        norm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), clip)
        ev[3].record()
        opt.step()
        ev[4].record()
        ev[4].synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        loss, norm = loss_sum.item() / k_micro, norm.item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise RuntimeError(f"rank {rank} of {world}: training diverged: loss {loss}, gradient norm {norm}")
        sample()
        before_last = ev[0].elapsed_time(ev[1])
        return dict(total=ev[0].elapsed_time(ev[4]), fwd_bwd=ev[0].elapsed_time(ev[2]),
                    clip=ev[2].elapsed_time(ev[3]), optimizer=ev[3].elapsed_time(ev[4]),
                    last_micro=ev[1].elapsed_time(ev[2]),
                    no_sync_micro=before_last / (k_micro - 1) if k_micro > 1 else None,
                    wall=wall, loss=loss, grad_norm=norm)

    timed, losses, first_wall, peak_alloc_warmup = [], [], 0.0, 0
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            peak_alloc_warmup = torch.cuda.max_memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            dist.barrier(device_ids=[rank])  # the timed steps start together
            torch.cuda.synchronize(dev)
        st = step(i == 0)
        losses.append(st["loss"])
        if i == 0:
            first_wall = st["wall"]
        if i >= a.warmup:
            timed.append(st)
        if rank == 0:
            kind = "warm-up" if i < a.warmup else "timed"
            print(f"[world {world}] step {i + 1}/{a.warmup + a.steps} ({kind}): {st['wall'] / 1e3:.2f} s on rank 0, "
                  f"loss {st['loss']:.4f}, gradient norm {st['grad_norm']:.3f}", flush=True)

    res = dict(
        rank=rank, device=torch.cuda.get_device_name(dev), micro_batches=k_micro, steps=timed,
        first_step_wall_ms=first_wall, loss_first=losses[0], loss_last=losses[-1],
        device_total_bytes=total, used_at_open_bytes=used_open, used_peak_bytes=peak_used,
        peak_allocated_bytes=torch.cuda.max_memory_allocated(dev),
        peak_allocated_warmup_bytes=max(peak_alloc_warmup, torch.cuda.max_memory_allocated(dev)),
        peak_reserved_bytes=torch.cuda.max_memory_reserved(dev),
    )
    if rank == 0:
        nccl = torch.cuda.nccl.version()
        res.update(torch=torch.__version__, triton=triton.__version__,
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                   parameters=n_params, vocab_size=vocab, notes=notes)
    dist.barrier(device_ids=[rank])  # leave together, so that no rank tears NCCL down under a peer still in a collective
    dist.destroy_process_group()
    return res


# ---------------------------------------------------------------------------
# The launcher.


class RunFailed(Exception):
    pass


def stop(procs):
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)


def launch(a, world, limit):
    """Runs one world size; returns the ranks' measurements by rank, or
    raises RunFailed with the reason (a rank's traceback, an exit code, the
    time limit)."""
    import torch.multiprocessing as mp
    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with tempfile.TemporaryDirectory(prefix="bench_ddp.") as tmp:
        ctx = mp.start_processes(rank_main, args=(world, port, a, tmp), nprocs=world, join=False,
                                 start_method="spawn")
        end = time.monotonic() + limit
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > end:
                    stop(ctx.processes)
                    raise RunFailed(f"timed out after {limit:.0f} s")
        except RunFailed:
            raise
        except Exception as e:  # a rank raised (its traceback is in the message) or died; join stopped the others
            stop(ctx.processes)
            raise RunFailed(f"{type(e).__name__}: {e}") from None
        except BaseException:  # KeyboardInterrupt: leave no rank behind
            stop(ctx.processes)
            raise
        out = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.json")
            try:
                with open(path) as f:
                    out.append(json.load(f))
            except (OSError, ValueError) as e:
                raise RunFailed(f"rank {r} exited without its result: {e}") from None
        return out


def summarize(a, world, ranks):
    """One layout's figures from its ranks' measurements: each timed step
    counts at its slowest rank."""
    n = len(ranks[0]["steps"])

    def step_max(key):
        return [max(r["steps"][i][key] for r in ranks) for i in range(n)]

    def med(key):
        return statistics.median(step_max(key))

    totals = step_max("total")
    tokens = a.global_batch * a.seq_len
    lay = dict(
        layout=layout_name(world), dp=world, sp=1, ranks=world, world_size=world,
        micro_batch=a.batch, micro_batches=ranks[0]["micro_batches"], tokens_per_step=tokens,
        step_ms=statistics.median(totals), step_wall_ms=med("wall"),
        fwd_bwd_ms=med("fwd_bwd"), grad_norm_ms=med("clip"), optimizer_ms=med("optimizer"),
        last_micro_ms=med("last_micro"), step_ms_all=[round(t, 3) for t in totals],
        first_step_wall_s=max(r["first_step_wall_ms"] for r in ranks) / 1e3,
    )
    lay["step_s"] = lay["step_ms"] / 1e3
    lay["tokens_per_s"] = tokens / lay["step_s"]
    lay["tokens_per_s_wall"] = tokens / (lay["step_wall_ms"] / 1e3)
    if ranks[0]["steps"][0]["no_sync_micro"] is not None:
        lay["no_sync_micro_ms"] = med("no_sync_micro")
        # The last micro-batch less a no_sync one: the all-reduce's part that
        # the backward did not hide. The smallest over the ranks, since the
        # others also wait for the slowest rank's backward.
        lay["exposed_allreduce_ms"] = min(
            statistics.median(s["last_micro"] - s["no_sync_micro"] for s in r["steps"]) for r in ranks)
    else:
        lay["no_sync_micro_ms"] = None
        lay["exposed_allreduce_ms"] = None
    # The mean of the ranks' losses is the loss of the global batch (the ranks hold equal shares).
    lay["loss_first"] = statistics.fmean(r["loss_first"] for r in ranks)
    lay["loss_last"] = statistics.fmean(r["loss_last"] for r in ranks)
    lay["grad_norm_last"] = ranks[0]["steps"][-1]["grad_norm"]
    for key in ("peak_allocated_bytes", "peak_allocated_warmup_bytes", "peak_reserved_bytes", "used_peak_bytes"):
        lay[key] = max(r[key] for r in ranks)
    lay["per_rank"] = [dict(rank=r["rank"], device=r["device"], peak_allocated_bytes=r["peak_allocated_bytes"],
                            peak_allocated_warmup_bytes=r["peak_allocated_warmup_bytes"],
                            peak_reserved_bytes=r["peak_reserved_bytes"], used_peak_bytes=r["used_peak_bytes"],
                            used_at_open_bytes=r["used_at_open_bytes"], device_total_bytes=r["device_total_bytes"],
                            step_ms_median=statistics.median(s["total"] for s in r["steps"]),
                            loss_last=r["loss_last"])
                       for r in ranks]
    return lay


def set_efficiency(layouts):
    base = next((l for l in layouts if l["dp"] == 1), None)
    for l in layouts:
        if base is None:
            l["speedup"] = l["efficiency"] = None
        else:
            l["speedup"] = l["tokens_per_s"] / base["tokens_per_s"]
            l["efficiency"] = l["speedup"] / l["ranks"]


def write_json(path, doc):
    if not path:
        return
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def default_world_sizes(n):
    sizes, w = [], 1
    while w <= n:
        sizes.append(w)
        w *= 2
    return sizes


def run(a, ap):
    force_env()
    try:
        import torch
    except ImportError as e:
        sys.exit(f"bench_ddp: PyTorch is not installed: {e}")
    for mod, why in (("einops", "mamba_ssm's modules use rearrange/repeat"), ("triton", "mamba_ssm's kernels")):
        try:
            __import__(mod)
        except ImportError:
            sys.exit(f"bench_ddp: the {mod} package is missing ({why})")
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_nccl_available():
        sys.exit("bench_ddp: this PyTorch has no NCCL backend for torch.distributed")
    a.mamba = os.path.abspath(a.mamba)  # the ranks resolve it themselves
    src = os.path.join(a.mamba, "mamba_ssm", "models", "mixer_seq_simple.py")
    if not os.path.isfile(src):
        sys.exit(f"bench_ddp: no mamba_ssm sources in {a.mamba} (expected {src})")
    ngpu = torch.cuda.device_count()  # counts without creating a context, which would take memory on GPU 0
    if ngpu < 1:
        sys.exit("bench_ddp: torch sees no CUDA device")
    sizes = a.world_sizes or default_world_sizes(ngpu)
    for w in sizes:
        if w > ngpu:
            ap.error(f"--world-sizes: {w} ranks, but torch sees {ngpu} GPU(s)")
        if a.global_batch % (a.batch * w):
            ap.error(f"--global-batch {a.global_batch} is not a multiple of --batch {a.batch} × world size {w}")

    deadline = time.monotonic() + a.timeout
    doc = dict(
        tool="pytorch-ddp+mamba_ssm", backend="pytorch DistributedDataParallel, NCCL",
        precision="torch.autocast bf16, fp32 parameters, gradients and AdamW moments (fused AdamW)",
        path="MambaLMHeadModel(Mamba2, use_mem_eff_path=False); fused_add_norm, residual_in_fp32",
        ddp=dict(bucket_cap_mb=a.bucket_mb, gradient_as_bucket_view=False, find_unused_parameters=False,
                 accumulation="no_sync() on every micro-batch but the last"),
        env=dict(NO_MULTICAST), gpus=ngpu,
        d_model=a.d_model, n_layer=a.n_layer, micro_batch=a.batch, seq_len=a.seq_len, global_batch=a.global_batch,
        tokens_per_step=a.global_batch * a.seq_len, warmup_steps=a.warmup, timed_steps=a.steps, lr=a.lr,
        max_grad_norm=a.max_grad_norm, seed=a.seed, world_sizes=sizes, layouts=[], failed=[],
    )
    print(f"bench_ddp: {ngpu} GPU(s); world sizes {sizes}; global batch {a.global_batch} × {a.seq_len} tokens "
          f"in micro-batches of {a.batch}; {a.warmup} warm-up and {a.steps} timed steps; "
          f"{' '.join(f'{k}={v}' for k, v in NO_MULTICAST.items())}", flush=True)
    status = 0
    for w in sizes:
        left = deadline - time.monotonic()
        if left < 30:
            reason = f"skipped: --timeout {a.timeout:.0f} s spent"
            print(f"bench_ddp: world size {w} {reason}", file=sys.stderr, flush=True)
            doc["failed"].append(dict(layout=layout_name(w), dp=w, sp=1, ranks=w, reason=reason))
            status = 1
            continue
        print(f"== world size {w}: {w} rank(s) × {a.global_batch // (a.batch * w)} micro-batch(es) of "
              f"{a.batch} × {a.seq_len}", flush=True)
        t0 = time.monotonic()
        try:
            ranks = launch(a, w, left)
        except RunFailed as e:
            print(f"bench_ddp: world size {w} failed: {e}", file=sys.stderr, flush=True)
            first = str(e).strip().splitlines()
            doc["failed"].append(dict(layout=layout_name(w), dp=w, sp=1, ranks=w,
                                      reason=f"failed: {first[-1] if first else 'unknown'}"[:300],
                                      error=str(e)))
            status = 1
            write_json(a.json, doc)
            continue
        r0 = ranks[0]
        for k in ("device", "torch", "triton", "nccl", "parameters", "vocab_size", "notes"):
            doc.setdefault(k, r0.get(k))
        lay = summarize(a, w, ranks)
        lay["wall_s"] = time.monotonic() - t0
        doc["layouts"].append(lay)
        set_efficiency(doc["layouts"])
        write_json(a.json, doc)
        eff = "-" if lay["efficiency"] is None else f"{100 * lay['efficiency']:.1f}%"
        print(f"world size {w}: step {lay['step_s']:.3f} s (wall {lay['step_wall_ms'] / 1e3:.3f} s), "
              f"{lay['tokens_per_s']:,.0f} tokens/s, efficiency {eff}, exposed all-reduce "
              f"{fmt_ms(lay['exposed_allreduce_ms'])}, peak allocated {lay['peak_allocated_bytes'] / GIB:.2f} GiB, "
              f"device in use {lay['used_peak_bytes'] / GIB:.2f} GiB, loss {lay['loss_last']:.4f}; "
              f"first step {lay['first_step_wall_s']:.1f} s", flush=True)
    print_summary(doc)
    write_json(a.json, doc)
    return status


def fmt_ms(v):
    return "-" if v is None else f"{v:.1f} ms"


def print_summary(doc):
    print(f"\ndevice: {doc.get('device', '?')}, torch {doc.get('torch', '?')}, triton {doc.get('triton', '?')}, "
          f"NCCL {doc.get('nccl', '?')}")
    print(f"model: mamba_ssm {doc['path']}; d_model {doc['d_model']}, {doc['n_layer']} layers, vocab "
          f"{doc.get('vocab_size', '?')}; {doc.get('parameters', '?')} parameters")
    for n in doc.get("notes") or []:
        print("note:", n)
    print("\n| layout | step s | tokens/s | speedup | efficiency | fwd+bwd ms | last micro-batch ms | "
          "no_sync micro-batch ms | clip ms | optimizer ms | peak allocated GiB | device in use GiB | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for l in doc["layouts"]:
        sp = "-" if l["speedup"] is None else f"{l['speedup']:.2f}"
        eff = "-" if l["efficiency"] is None else f"{100 * l['efficiency']:.1f}%"
        nsm = "-" if l["no_sync_micro_ms"] is None else f"{l['no_sync_micro_ms']:.1f}"
        print(f"| {l['layout']} | {l['step_s']:.3f} | {l['tokens_per_s']:,.0f} | {sp} | {eff} | {l['fwd_bwd_ms']:.1f} | "
              f"{l['last_micro_ms']:.1f} | {nsm} | {l['grad_norm_ms']:.2f} | {l['optimizer_ms']:.2f} | "
              f"{l['peak_allocated_bytes'] / GIB:.2f} | {l['used_peak_bytes'] / GIB:.2f} | {l['loss_last']:.4f} |")
    for f in doc["failed"]:
        print(f"| {f['layout']} | {f['reason']} | | | | | | | | | | | |")


# ---------------------------------------------------------------------------
# The table: distbench's layouts beside this script's.


def load(path):
    """The JSON document at path, or (None, why)."""
    if not path:
        return None, "not given"
    try:
        with open(path) as f:
            return json.load(f), ""
    except FileNotFoundError:
        return None, "not run"
    except (OSError, ValueError) as e:
        print(f"bench_ddp: cannot read {path}: {e}", file=sys.stderr)
        return None, f"unreadable ({type(e).__name__})"


def _items(doc, keys):
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        for k in keys:
            if isinstance(doc.get(k), list):
                return doc[k]
    return []


def _num(d, *keys):
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def _layout(d):
    """(dp, sp) of a result row: its dp and sp fields, else its layout
    name (dp2×sp1, dp2xsp1 or 2x1); (None, None) when neither says."""
    dp, sp = _num(d, "dp", "world_size"), _num(d, "sp")
    name = str(d.get("layout", ""))
    if dp is None:
        m = re.search(r"dp\s*(\d+)\s*[x×*]?\s*sp\s*(\d+)", name) or re.match(r"\s*(\d+)\s*[x×]\s*(\d+)", name)
        if not m:
            return None, None
        dp, sp = float(m.group(1)), float(m.group(2))
    return int(dp), int(sp if sp is not None else 1)


def _overlapped(d):
    if d.get("no_overlap") is True or d.get("overlap") is False:
        return False
    return "no-overlap" not in str(d.get("layout", "")) and "no overlap" not in str(d.get("layout", ""))


def rows_of(doc):
    """{(dp, sp): row} of a distbench or bench_ddp document, each row with
    tokens_per_s, efficiency (the document's own, else from its speedup,
    else from its dp1×sp1 row) and the row itself; with the overlapped
    run where a layout also ran without overlap."""
    rows = {}
    for d in _items(doc, ("layouts", "results", "rows", "grid", "runs")):
        if not isinstance(d, dict):
            continue
        dp, sp = _layout(d)
        tps = _num(d, "tokens_per_s", "tokens_per_sec", "tokens_s")
        if dp is None or tps is None:
            continue
        ranks = int(_num(d, "ranks", "world_size") or dp * sp)
        key = (dp, sp)
        row = dict(tokens_per_s=tps, ranks=ranks, efficiency=_num(d, "efficiency", "scaling_efficiency"),
                   speedup=_num(d, "speedup"), step_s=_num(d, "step_s"), raw=d, no_overlap_tps=None)
        if not _overlapped(d):
            row["no_overlap_tps"] = tps
        old = rows.get(key)
        if old is not None:
            if _overlapped(d) and not _overlapped(old["raw"]):
                row["no_overlap_tps"] = old["tokens_per_s"]
            else:
                if not _overlapped(d):
                    old["no_overlap_tps"] = tps
                continue
        rows[key] = row
    base = rows.get((1, 1))
    for r in rows.values():
        if r["efficiency"] is None:
            if r["speedup"] is not None:
                r["efficiency"] = r["speedup"] / r["ranks"]
            elif base is not None:
                r["efficiency"] = r["tokens_per_s"] / (r["ranks"] * base["tokens_per_s"])
    return rows


def reasons_of(doc):
    """{(dp, sp): why} from a document's list of failed or skipped layouts."""
    out = {}
    if not isinstance(doc, dict):
        return out
    for key in ("failed", "errors", "skipped"):
        for d in doc.get(key) or []:
            if isinstance(d, dict):
                dp, sp = _layout(d)
                if dp is not None:
                    out[(dp, sp)] = str(d.get("reason") or d.get("error") or key).splitlines()[0]
    return out


def _v(d, key, spec=""):
    """d[key] formatted by spec ("GiB": bytes as GiB), or "?" when absent."""
    v = d.get(key)
    if v is None:
        return "?"
    if spec == "GiB":
        v, spec = _num(d, key), ".2f"
        if v is None:
            return "?"
        v /= GIB
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _meta(doc, *keys):
    """The first of keys that doc has, at its top level or under "model"."""
    if not isinstance(doc, dict):
        return None
    for d in (doc, doc.get("model") if isinstance(doc.get("model"), dict) else {}):
        for k in keys:
            if d.get(k) is not None:
                return d[k]
    return None


def _stopped(doc):
    """A document's own word on why it stopped early ("error": distbench's), or ""."""
    e = doc.get("error") if isinstance(doc, dict) else None
    return f"failed: {str(e).strip().splitlines()[0]}"[:200] if e else ""


def _cell_tps(r):
    return f"{r['tokens_per_s']:,.0f}"


def _cell_eff(r):
    return "-" if r["efficiency"] is None else f"{100 * r['efficiency']:.1f}%"


def table(ours, theirs, why=("", ""), expected=()):
    """The markdown comparison of distbench's JSON (ours) and this script's
    (theirs), one row per layout (dp, sp) found in either or listed in
    expected; either may be None, which why (ours, theirs) then explains."""
    o_rows, t_rows = rows_of(ours), rows_of(theirs)
    o_why, t_why = reasons_of(ours), reasons_of(theirs)
    why = (_stopped(ours) or why[0], _stopped(theirs) or why[1])
    keys = sorted(set(o_rows) | set(t_rows) | set(o_why) | set(t_why) | set(expected),
                  key=lambda k: (k[0] * k[1], k[1], k[0]))
    lines = []
    t = theirs if isinstance(theirs, dict) else {}
    o = ours if isinstance(ours, dict) else {}
    dev = t.get("device") or o.get("device")
    if dev:
        lines.append(f"device: {dev}" + (f" ({t['gpus']} GPUs)" if t.get("gpus") else ""))
    if t:
        lines.append(f"model: mamba2 d_model {_v(t, 'd_model')}, {_v(t, 'n_layer')} layers, vocab "
                     f"{_v(t, 'vocab_size')}, {_v(t, 'parameters', ',')} parameters; global batch "
                     f"{_v(t, 'global_batch')} × {_v(t, 'seq_len')} tokens ({_v(t, 'tokens_per_step', ',')} per step), "
                     f"micro-batches of {_v(t, 'micro_batch')} per rank; median of {_v(t, 'timed_steps')} steps "
                     f"after {_v(t, 'warmup_steps')} warm-up, each step at its slowest rank")
    for name, names in (("tokens per step", ("global_batch_tokens", "tokens_per_step")),
                        ("global batch", ("global_batch",)), ("sequence length", ("seq_len",)),
                        ("micro-batch", ("micro_batch",)), ("d_model", ("d_model",)), ("layers", ("n_layer",)),
                        ("vocabulary", ("vocab_size",))):
        ov, tv = _meta(o, *names), _meta(t, *names)
        if ov is not None and tv is not None and ov != tv:
            lines.append(f"**Warning: the {name} differs (ours {ov}, PyTorch {tv}): the rows do not compare the same "
                         "step.**")
    if lines:
        lines.append("")
    lines.append("| dp × sp | GPUs | ours tokens/s | ours efficiency | PyTorch DDP tokens/s | PyTorch efficiency "
                 "| ours / PyTorch |")
    lines.append("|---|---|---|---|---|---|---|")
    if not keys:
        lines.append(f"| - | - | {why[0] or 'not run'} | | {why[1] or 'not run'} | | |")
    for k in keys:
        dp, sp = k
        orow, trow = o_rows.get(k), t_rows.get(k)
        if orow:
            oc = f"{_cell_tps(orow)} | {_cell_eff(orow)}"
        else:
            oc = f"{o_why.get(k) or why[0] or 'not run'} |"
        if trow:
            tc = f"{_cell_tps(trow)} | {_cell_eff(trow)}"
        elif sp > 1:
            tc = "not run (DDP has no sequence parallelism) |"
        else:
            tc = f"{t_why.get(k) or why[1] or 'not run'} |"
        ratio = f"{orow['tokens_per_s'] / trow['tokens_per_s']:.2f}" if orow and trow else ""
        gpus = (orow or trow or {}).get("ranks", dp * sp)
        lines.append(f"| {dp} × {sp} | {gpus} | {oc} | {tc} | {ratio} |")
    lines.append("")
    lines.append("- Efficiency: tokens/s over GPUs × the tokens/s of one GPU (dp 1 × sp 1) in the same run, at the "
                 "same global batch; ours / PyTorch is the ratio of tokens/s, above 1 is better.")
    if t:
        dd = t.get("ddp") or {}
        lines.append(f"- PyTorch: torch {t.get('torch', '?')}, triton {t.get('triton', '?')}, NCCL {t.get('nccl', '?')}; "
                     f"{t.get('path', '')}; {t.get('precision', '')}; DistributedDataParallel, buckets of "
                     f"{dd.get('bucket_cap_mb', '?')} MB, {dd.get('accumulation', '')}; "
                     f"{' '.join(f'{k}={v}' for k, v in (t.get('env') or {}).items())}.")
        for k in sorted(t_rows):
            l = t_rows[k]["raw"]
            ex, ns = _num(l, "exposed_allreduce_ms"), _num(l, "no_sync_micro_ms")
            lines.append(f"- PyTorch dp {k[0]}: step {_v(l, 'step_s', '.3f')} s, {_v(l, 'micro_batches')} "
                         f"micro-batches per rank, the last (with the all-reduce) {_v(l, 'last_micro_ms', '.1f')} ms"
                         + (f" against {ns:.1f} ms for a no_sync one (all-reduce exposed about {ex:.1f} ms)"
                            if ex is not None and ns is not None else "")
                         + f"; peak allocated {_v(l, 'peak_allocated_bytes', 'GiB')} GiB, device in use "
                         f"{_v(l, 'used_peak_bytes', 'GiB')} GiB (largest rank); loss {_v(l, 'loss_first', '.3f')} "
                         f"-> {_v(l, 'loss_last', '.3f')}.")
        for n in t.get("notes") or []:
            lines.append(f"- PyTorch, {n}.")
    if o.get("backend"):
        lines.append(f"- Ours: {o.get('tool', 'distbench')}, backend {_v(o, 'backend')}, {_v(o, 'precision')}; "
                     f"gradient buckets of {_v(o, 'bucket_mib')} MiB; best of {_v(o, 'rounds')} round(s) of "
                     f"{_v(o, 'timed_steps')} timed steps after {_v(o, 'warmup_steps')} warm-up, each a mean at the "
                     f"slowest rank; {_v(o, 'gomaxprocs_per_rank')} GOMAXPROCS per rank.")
    for k in sorted(o_rows):
        l, nov = o_rows[k]["raw"], o_rows[k]["no_overlap_tps"]
        parts = []
        if _num(l, "step_s") is not None:
            parts.append(f"step {_v(l, 'step_s', '.3f')} s")
        if _num(l, "exposed_allreduce_ms") is not None:
            parts.append(f"all-reduce exposed {_v(l, 'exposed_allreduce_ms', '.1f')} ms")
        if nov is not None:
            parts.append(f"{nov:,.0f} tokens/s without overlapping the all-reduce and the backward"
                         + ("" if _overlapped(l) else " (its only run, in the table)"))
        if _num(l, "device_used_peak_bytes"):
            parts.append(f"device in use {_v(l, 'device_used_peak_bytes', 'GiB')} GiB (largest rank)")
        if _num(l, "loss") is not None:
            parts.append(f"loss {_v(l, 'loss', '.3f')}")
        if parts:
            lines.append(f"- Ours {k[0]} × {k[1]}: {'; '.join(parts)}.")
    for k in sorted(t_why):
        if k not in t_rows:
            lines.append(f"- PyTorch dp {k[0]}: {t_why[k]}.")
    for k in sorted(o_why):
        if k not in o_rows:
            lines.append(f"- Ours {k[0]} × {k[1]}: {o_why[k]}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------


def parse_grid(s):
    out = []
    for f in s.split(","):
        f = f.strip()
        if not f:
            continue
        m = re.fullmatch(r"([1-9][0-9]*)[x×]([1-9][0-9]*)", f)
        if not m:
            raise argparse.ArgumentTypeError(f"{f!r} is not a layout DPxSP (e.g. 2x1)")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def parse_sizes(s):
    out = []
    for f in s.split(","):
        f = f.strip()
        if not f:
            continue
        try:
            w = int(f)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{f!r} is not an integer") from None
        if w < 1:
            raise argparse.ArgumentTypeError(f"world size {w} must be at least 1")
        if w not in out:
            out.append(w)
    if not out:
        raise argparse.ArgumentTypeError("no world size given")
    return sorted(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mamba", default=".mamba_ref", help="directory holding the mamba_ssm package sources")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50288, help="vocabulary (padded to a multiple of 16)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch and rank")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=256,
                    help="sequences per optimizer step, all ranks; a multiple of --batch × every world size")
    ap.add_argument("--world-sizes", type=parse_sizes, default=None,
                    help="comma-separated ranks per run, e.g. 1,2 (default: 1 and every power of two up to the GPUs)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first compiles and autotunes)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping (the norm is computed)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="DDP's bucket_cap_mb")
    ap.add_argument("--nccl-timeout", type=float, default=300.0,
                    help="seconds: init_process_group's timeout (the rendezvous and every collective)")
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds for all world sizes together; the ranks of a run still going are stopped")
    ap.add_argument("--json", default="", help="write the results as JSON to this file (after each world size)")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --ours and --theirs")
    ap.add_argument("--ours", default="", help="distbench's JSON (with --table)")
    ap.add_argument("--theirs", default="", help="this script's JSON (with --table)")
    ap.add_argument("--ours-status", default="", help="with --table: what to print for missing --ours results")
    ap.add_argument("--theirs-status", default="", help="with --table: what to print for missing --theirs results")
    ap.add_argument("--grid", type=parse_grid, default=[],
                    help="with --table: layouts DPxSP that get a row even where neither side has a result, e.g. 1x1,2x1")
    ap.add_argument("--out", default="", help="also write the table to this file (with --table)")
    a = ap.parse_args()
    if a.table:
        ours, o_why = load(a.ours)
        theirs, t_why = load(a.theirs)
        text = table(ours, theirs, (a.ours_status or o_why, a.theirs_status or t_why), a.grid)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
        return 0
    for name in ("d_model", "n_layer", "vocab", "batch", "seq_len", "global_batch", "steps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {a.warmup}")
    if a.max_grad_norm < 0:
        ap.error(f"--max-grad-norm must be >= 0, got {a.max_grad_norm}")
    for name in ("bucket_mb", "nccl_timeout", "timeout"):
        if not getattr(a, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    return run(a, ap)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench_ddp: interrupted", file=sys.stderr)
        sys.exit(130)
