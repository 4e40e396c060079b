"""The fla baseline of the GPU check: flash-linear-attention's (fla-core 0.6.0, PyTorch + Triton) chunked linear
attention timed at the attention benchmark's shapes, so that its rows can sit beside ours.

benchmarks/gpu_check.py runs this file as a subprocess (torch and JAX never share a process or a CUDA context)
and renders what it wrote (fla_gpu.md, and the rows of the benchmark's batch merged into attention_gpu.md/.json).
Standalone: python benchmarks/fla_baseline.py --out DIR [--seconds S] [--smoke].

Rows (names as in the tables):
  "fla chunk_linear_attn"  fla.ops.linear_attn.chunk_linear_attn(φq, φk, v, scale=1, normalize=True): causal linear
                           attention normalised by φq·Σφk, Triton chunked kernels (chunk 64) — the algorithm of
                           our "linear" rows (LoLCATS form=linear) without the feature maps, which fla takes
                           already applied: φq, φk are (B, T, H, F') with F' = 2F (our fullspace Hedgehog maps'
                           output dim); v is repeated from K to H heads (fla's linear attention has no grouped
                           value heads), outside the timing.
  "fla linear+window W"    the same plus fla.ops.attn.parallel_attn(q, k, v, window_size=W) on the raw q (H heads)
                           and grouped k, v (K heads), the outputs summed: what a sliding-window + linear hybrid
                           built from fla's kernels costs, a proxy for our "hybrid-tk" rows (LoLCATS shares one
                           normaliser between the two parts and uses terraced windows; fla has no such kernel).
Per cell (B, T, row, mode ∈ {fwd, fwd+bwd}): bf16 inputs, one first call (Triton compilation and fla's
autotuning, reported as "compile s"), one call whose peak allocation above the inputs is "memory", then up to
`reps` calls timed with CUDA events (median, min). fwd runs under no_grad; fwd+bwd is the forward plus
torch.autograd.grad of ⟨y, ct⟩ for every input. Before timing, each row's output is checked against a float32
quadratic definition written here (parity rows). Results go to fla_gpu.json after every cell (written whole,
then renamed), so a run cut short keeps what it measured.

Without CUDA (the CPU smoke) every fla cell is a "not run (no CUDA)" row and the run reports itself incomplete
(exit 1); a naive quadratic linear attention in torch runs through the same timing and reporting code on the CPU
(rows named "torch naive linear (CPU smoke stand-in)"), so that code is exercised without a GPU.
Exit status: 0 only if fla ran, every parity check passed and no cell failed; cells left for the time limit are
reported "not run" without failing the run (as in the attention benchmark).
Shapes: B batch, T tokens, H query heads, K kv heads, D head dim, F' feature dim after the map, W window.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lolcats_jax.fsio import write_text_atomic  # noqa: E402  (plain Python: no JAX import here)

LINEAR = "fla chunk_linear_attn"
STAND_IN = "torch naive linear (CPU smoke stand-in)"
PARITY_TOL = 2e-2  # relative RMS of bf16 outputs vs the float32 definition (gpu_check's bf16 output tolerance)


def hybrid_name(W: int) -> str:
    return f"fla linear+window W={W}"


def naive_linear_attention(phi_q_BTHF, phi_k_BTHF, v_BTHD):
    """y_t = Σ_{s≤t} (φq_t·φk_s) v_s / Σ_{s≤t} φq_t·φk_s, computed quadratically (the definition)."""
    import torch

    T = phi_q_BTHF.shape[1]
    scores_BHTS = torch.einsum("bthf,bshf->bhts", phi_q_BTHF, phi_k_BTHF)
    scores_BHTS = scores_BHTS * torch.ones(T, T, device=scores_BHTS.device).tril()
    y_BHTD = torch.einsum("bhts,bshd->bhtd", scores_BHTS, v_BTHD) / scores_BHTS.sum(-1, keepdim=True)
    return y_BHTD.transpose(1, 2)


def naive_window_attention(q_BTHD, k_BTKD, v_BTKD, W: int):
    """Softmax attention of query t over keys t-W+1..t (scale 1/√D); query head h reads kv head h // (H/K)."""
    import torch

    T, H, K, D = q_BTHD.shape[1], q_BTHD.shape[2], k_BTKD.shape[2], q_BTHD.shape[3]
    k_BTHD, v_BTHD = (x.repeat_interleave(H // K, dim=2) for x in (k_BTKD, v_BTKD))
    logits_BHTS = torch.einsum("bthd,bshd->bhts", q_BTHD, k_BTHD) / math.sqrt(D)
    t, s = torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
    keep_TS = ((s <= t) & (s > t - W)).to(logits_BHTS.device)
    probs_BHTS = torch.softmax(logits_BHTS.masked_fill(~keep_TS, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bhtd", probs_BHTS, v_BTHD).transpose(1, 2)


def make_inputs(B: int, T: int, H: int, K: int, D: int, Fp: int, dtype, device, seed: int = 0) -> dict:
    """Raw q (B,T,H,D), k/v (B,T,K,D); feature-mapped φq/φk (B,T,H,F') — positive and summing to one over F',
    as our softmax_dim maps' outputs are; v repeated to H heads for fla's linear attention; a cotangent."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    x = dict(q=rand(B, T, H, D), k=rand(B, T, K, D), v=rand(B, T, K, D),
             phi_q=torch.softmax(rand(B, T, H, Fp).float(), -1).to(dtype),
             phi_k=torch.softmax(rand(B, T, H, Fp).float(), -1).to(dtype), ct=rand(B, T, H, D))
    x["v_rep"] = x["v"].repeat_interleave(H // K, dim=2).contiguous()
    return x


def row_functions(W: int, smoke_stand_in: bool) -> dict:
    """{row name: (fn(inputs) -> y (B,T,H,D), names of the differentiated inputs, float32 definition)}."""
    if smoke_stand_in:
        return {STAND_IN: (lambda x: naive_linear_attention(x["phi_q"], x["phi_k"], x["v_rep"]),
                           ("phi_q", "phi_k", "v_rep"),
                           lambda x: naive_linear_attention(x["phi_q"], x["phi_k"], x["v_rep"]))}
    from fla.ops.attn import parallel_attn
    from fla.ops.linear_attn import chunk_linear_attn

    def linear(x):
        return chunk_linear_attn(x["phi_q"], x["phi_k"], x["v_rep"], scale=1.0, normalize=True)[0]

    def hybrid(x):
        return linear(x) + parallel_attn(x["q"], x["k"], x["v"], window_size=W)

    def linear_def(x):
        return naive_linear_attention(x["phi_q"], x["phi_k"], x["v_rep"])

    def hybrid_def(x):
        return linear_def(x) + naive_window_attention(x["q"], x["k"], x["v"], W)

    return {LINEAR: (linear, ("phi_q", "phi_k", "v_rep"), linear_def),
            hybrid_name(W): (hybrid, ("phi_q", "phi_k", "v_rep", "q", "k", "v"), hybrid_def)}


class Timer:
    """Seconds of one call: CUDA events around it on a GPU, the host clock (after the call returns) on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn) -> float:
        import torch

        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def time_cell(fn, grad_names: tuple[str, ...], x: dict, mode: str, timer: Timer, reps: int, budget_s: float) -> dict:
    """First call (compile / autotune) seconds, one call's peak bytes above the inputs (CUDA only), then up to
    `reps` timed calls (fewer if they would exceed `budget_s`): median and min seconds, runs."""
    import torch

    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(x)
    else:
        leaves = {n: x[n].detach().requires_grad_(True) for n in grad_names}
        xg = {**x, **leaves}

        def call():
            torch.autograd.grad(fn(xg), tuple(leaves.values()), x["ct"])

    t0 = time.perf_counter()
    call()
    if timer.cuda:
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    mem_bytes = None
    if timer.cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        mem_bytes = int(torch.cuda.max_memory_allocated() - before)
    first = timer(call)
    times = [first] + [timer(call) for _ in range(max(0, min(reps, int(budget_s / max(first, 1e-9))) - 1))]
    return dict(median_s=statistics.median(times), min_s=min(times), compile_s=compile_s, mem_bytes=mem_bytes,
                runs=len(times))


def parity(name: str, fn, definition, dtype, W: int, H: int, K: int, D: int, Fp: int, device) -> dict:
    """Relative RMS of `fn` on `dtype` inputs against its definition in float32 on the same inputs, at a small
    shape whose T is no multiple of the chunk."""
    import torch

    x = make_inputs(1, 300, H, K, D, Fp, dtype, device, seed=1)
    with torch.no_grad():
        y, ref = fn(x).float(), definition({n: t.float() for n, t in x.items()})
    err = float(torch.sqrt(torch.mean((y - ref) ** 2)) / torch.sqrt(torch.mean(ref ** 2)))
    return dict(impl=name, T=300, dtype=str(dtype).removeprefix("torch."), rel_rms=err, tol=PARITY_TOL,
                **{"pass": math.isfinite(err) and err < PARITY_TOL})


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 torch matmul throughput (TFLOP/s), the reference of this table's % of peak."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    timer = Timer(True)
    timer(lambda: a @ a)
    return 2.0 * n**3 / statistics.median([timer(lambda: a @ a) for _ in range(reps)]) / 1e12


def _availability() -> tuple[str | None, dict]:
    """(None if fla can run here else why not, versions of torch / triton / fla)."""
    versions = {}
    try:
        import torch
    except Exception as err:  # noqa: BLE001 - any import problem means "unavailable"
        return f"torch not importable: {type(err).__name__}: {err}", versions
    versions["torch"] = torch.__version__
    if not torch.cuda.is_available():
        return f"no CUDA: torch {torch.__version__} sees no GPU", versions
    try:
        import triton

        versions["triton"] = triton.__version__
        import fla
        import fla.ops.attn  # noqa: F401
        import fla.ops.linear_attn  # noqa: F401

        versions["fla"] = fla.__version__
    except Exception as err:  # noqa: BLE001
        return f"fla not importable: {type(err).__name__}: {err}", versions
    return None, versions


def run(out_dir: str, seconds: float, *, batches, lengths, H, K, D, Fp, W, reps, budget_s, smoke) -> bool:
    deadline = time.monotonic() + seconds
    missing, versions = _availability()
    cuda = missing is None
    stand_in = not cuda and smoke and "torch" in versions
    result = dict(config=dict(device="gpu" if cuda else "cpu", versions=versions, batches=list(batches),
                              lengths=list(lengths), H=H, K=K, D=D, F=Fp // 2, W=W,
                              dtype="float32" if smoke and not cuda else "bfloat16", reps=reps, unavailable=missing,
                              smoke=smoke),
                  notes=[], peak_tflops=None, parity=[], rows=[])
    out = os.path.join(out_dir, "fla_gpu.json")
    save = lambda: write_text_atomic(out, json.dumps(result, indent=1))
    names = [LINEAR, hybrid_name(W)]
    if missing:
        print(f"== fla: not run ({missing})", file=sys.stderr, flush=True)
        result["rows"] = [dict(impl=n, B=B, T=T, mode=m, skip=f"not run ({missing})")
                          for B in batches for n in names for T in lengths for m in ("fwd", "fwd+bwd")]
        save()
        if not stand_in:
            return False
    import torch

    device = "cuda" if cuda else "cpu"
    if cuda:
        import fla

        result["config"]["device_kind"] = torch.cuda.get_device_name()
        result["peak_tflops"] = matmul_peak_tflops()
        result["notes"].append(f"fla {fla.__version__}: {names[0]} = fla.ops.linear_attn.chunk_linear_attn(φq, φk, "
                               f"v, scale=1, normalize=True); {names[1]} adds fla.ops.attn.parallel_attn(q, k, v, "
                               f"window_size={W}) (cost proxy of a hybrid; see benchmarks/fla_baseline.py)")
        result["notes"].append("fla compile s = the cell's first call; the first cells include fla's Triton "
                               "autotuning (once per process: its tuning keys exclude B and T)")
    else:
        result["config"]["device_kind"] = "cpu"
    dtype = getattr(torch, result["config"]["dtype"])
    fns = row_functions(W, smoke_stand_in=not cuda)
    ok = cuda
    for name, (fn, _, definition) in fns.items():
        try:
            check = parity(name, fn, definition, dtype, W, H, K, D, Fp, device)
        except Exception as err:  # noqa: BLE001 - a parity that cannot run is a failed one
            traceback.print_exc()
            check = dict(impl=name, T=300, error=f"{type(err).__name__}: {err}"[:500], **{"pass": False})
        result["parity"].append(check)
        ok &= check["pass"]
        print(f"== fla parity {name}: {json.dumps(check)}", flush=True)
        save()
    for B in batches:
        for name, (fn, grad_names, _) in fns.items():
            for T in lengths:
                x = None  # made for the first cell that runs
                for mode in ("fwd", "fwd+bwd"):
                    cell = dict(impl=name, B=B, T=T, mode=mode)
                    if time.monotonic() > deadline:
                        cell["skip"] = f"not run: the fla stage's {seconds:.0f} s time limit was reached"
                    else:
                        try:
                            x = make_inputs(B, T, H, K, D, Fp, dtype, device) if x is None else x
                            cell.update(time_cell(fn, grad_names, x, mode, Timer(cuda), reps, budget_s))
                            cell["tokens_per_s"] = B * T / cell["median_s"]
                        except Exception as err:  # noqa: BLE001 - a failing cell is reported, the grid continues
                            traceback.print_exc()
                            cell["skip"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                            ok = False
                    result["rows"].append(cell)
                    print(f"{name:>34} B={B} T={T:>6} {mode:>8}: "
                          + (cell["skip"] if "skip" in cell else f"{cell['median_s'] * 1e3:.2f} ms"), flush=True)
                    save()
                del x
                if cuda:
                    torch.cuda.empty_cache()
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=60.0, help="start no cell after this many seconds")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--feature-dim", dest="Fp", type=int, default=128, help="F' (φq, φk width): 2F of our maps")
    p.add_argument("--W", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget-s", dest="budget_s", type=float, default=5.0, help="timed seconds per cell at most")
    p.add_argument("--smoke", action="store_true", help="CPU smoke: the stand-in rows run where CUDA is missing")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    ok = run(a.out, a.seconds, batches=a.batches, lengths=a.lengths, H=a.H, K=a.K, D=a.D, Fp=a.Fp, W=a.W,
             reps=a.reps, budget_s=a.budget_s, smoke=a.smoke)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
