"""Attention benchmark: implementation × sequence length × {forward, forward+backward}.

Shapes: q, k, v [B, T, H, D]; Hedgehog feature maps w (H, D, F) with F' = 2F (fullspace softmax_dim); window W.
Per cell: median wall time of the jitted function (compile excluded, reported separately), tokens/s = B·T / time,
memory = compiled temp + output bytes (`jit(...).lower(...).compile().memory_analysis()`), and on GPU the achieved
TFLOP/s of a nominal FLOP count (`model_flops`) against a measured bf16 matmul peak. Rows: LoLCATS hybrid (tk, sw)
and plain causal linear attention (same features) for the chunked pure-JAX backend and, on GPU, the Pallas and Triton
kernels; the quadratic reference; softmax attention via `jax.nn.dot_product_attention` (XLA; cuDNN on GPU).
Cells that would not fit (quadratic maps) or run too long are skipped with the reason in the table.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from lolcats_jax.bench.output import write_table
from kernels.lolcats import Backend, LolcatsSpec, lolcats_attention
from kernels.lolcats.timing import random_inputs, time_jitted


@dataclasses.dataclass(frozen=True)
class Shapes:
    B: int
    H: int
    D: int
    F: int  # learned feature dim (F' = 2F)
    W: int
    dtype: str
    K: int | None = None  # key/value heads (grouped-query attention); None = H

    @property
    def kv_heads(self) -> int:
        return self.H if self.K is None else self.K

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)


DEFAULTS = {
    "cpu": dict(shapes=Shapes(B=1, H=4, D=64, F=64, W=64, dtype="float32"), lengths=[1024, 2048, 4096, 8192, 16384],
                reps=5, budget_s=100.0),
    "gpu": dict(shapes=Shapes(B=1, H=32, D=128, F=64, W=64, dtype="bfloat16", K=8),  # Llama-3.1-8B's heads
                lengths=[1024, 2048, 4096, 8192, 16384, 32768, 65536], reps=10, budget_s=20.0),
}


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "hybrid" | "linear" | "softmax" (FLOP model and memory model)
    fn: Callable  # fn(q, k, v, fmap, theta) -> y
    quadratic: bool = False  # materialises (B, H, T, T) maps


def _lolcats(spec: LolcatsSpec, backend: Backend) -> Callable:
    return lambda q, k, v, fmap, theta: lolcats_attention(q, k, v, fmap, theta, spec, backend=backend)


def _softmax(implementation: str | None) -> Callable:
    return lambda q, k, v, fmap, theta: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                     implementation=implementation)


def implementations(device: str, W: int) -> tuple[list[Impl], list[str]]:
    """(rows to run, notes about rows that are not available here)."""
    tk, sw = LolcatsSpec(window="tk", window_size=W), LolcatsSpec(window="sw", window_size=W)
    lin = LolcatsSpec(form="linear", window_size=W)
    impls = [Impl("hybrid-tk chunked", "hybrid", _lolcats(tk, Backend.CHUNKED)),
             Impl("hybrid-sw chunked", "hybrid", _lolcats(sw, Backend.CHUNKED)),
             Impl("linear chunked", "linear", _lolcats(lin, Backend.CHUNKED))]
    notes = []
    if device == "gpu":
        impls += [Impl("hybrid-tk pallas", "hybrid", _lolcats(tk, Backend.PALLAS)),
                  Impl("hybrid-sw pallas", "hybrid", _lolcats(sw, Backend.PALLAS)),
                  Impl("linear pallas", "linear", _lolcats(lin, Backend.PALLAS))]
        try:
            import jax_triton  # noqa: F401

            impls.append(Impl("hybrid-tk triton", "hybrid", _lolcats(tk, Backend.TRITON)))
        except ImportError as err:
            notes.append(f"hybrid-tk triton: not run (jax_triton not importable: {err})")
    else:
        notes.append("pallas / triton rows: GPU only (on CPU the Pallas kernels run in interpret mode, "
                     "which is a correctness tool, not a speed measurement)")
    impls.append(Impl("hybrid-tk reference", "hybrid", _lolcats(tk, Backend.REFERENCE), quadratic=True))
    impls.append(Impl("softmax xla", "softmax", _softmax("xla"), quadratic=True))
    if device == "gpu":
        impls.append(Impl("softmax cudnn", "softmax", _softmax("cudnn")))
    return impls, notes


def model_flops(kind: str, s: Shapes, T: int, C: int = 64, backward: bool = False) -> float:
    """Nominal FLOPs (2 per multiply-add) of the algorithm; backward adds 2.5× the forward (FlashAttention rule).

    softmax: causal QKᵀ and PV (2·B·H·T²·D). linear: feature maps of q and k (2·2·T·D·F), state read and update
    (2·2·T·F'·D) and the causal in-chunk tile (2·2·T·C·(F'+D)/2). hybrid: feature maps, state read/update, and the
    two window tiles per chunk (2·2·T·2C·D for QKᵀ and PV).
    """
    B, H, D, F = s.B, s.H, s.D, s.F
    Fp = 2 * F
    if kind == "softmax":
        fwd = 2.0 * B * H * T * T * D
    elif kind == "linear":
        fwd = B * H * T * (4.0 * D * F + 4.0 * Fp * D + 2.0 * C * (Fp + D))
    else:
        fwd = B * H * T * (4.0 * D * F + 4.0 * Fp * D + 8.0 * C * D)
    return fwd * (3.5 if backward else 1.0)


def quadratic_bytes(kind: str, mode: str, s: Shapes, T: int) -> float:
    """Rough size of the (B, H, T, T) float32 maps a quadratic implementation holds at once: softmax ~2 maps
    forward / 5 with the backward; the LoLCATS reference (logits, masks, exponentials, linear scores) ~5 / 12."""
    maps = {("softmax", "fwd"): 2, ("softmax", "fwd+bwd"): 5}.get((kind, mode), 5 if mode == "fwd" else 12)
    return maps * s.B * s.H * T * T * 4.0


def make_inputs(s: Shapes, T: int, seed: int = 0):
    return random_inputs(s.B, T, s.H, s.kv_heads, s.D, s.F, s.jnp_dtype, seed=seed)


def _step_fn(impl: Impl, mode: str):
    if mode == "fwd":
        return jax.jit(impl.fn)

    def loss(q, k, v, fmap, theta, ct):
        return jnp.sum(impl.fn(q, k, v, fmap, theta).astype(jnp.float32) * ct.astype(jnp.float32))

    argnums = (0, 1, 2) if impl.kind == "softmax" else (0, 1, 2, 3, 4)
    return jax.jit(jax.grad(loss, argnums=argnums))


def time_cell(impl: Impl, mode: str, args, ct, reps: int, budget_s: float) -> dict:
    """Compile, warm up, then time up to `reps` runs (fewer if they would exceed `budget_s`); returns seconds
    (median, min), compile seconds, memory bytes, number of timed runs."""
    return time_jitted(_step_fn(impl, mode), args if mode == "fwd" else (*args, ct), reps, budget_s)


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matmul throughput (TFLOP/s) of the default device: the reference for achieved TFLOP/s."""
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, a))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, a))
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e12


def device_memory_bytes() -> float:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 16e9


def run(device: str, shapes: Shapes, lengths: list[int], reps: int, budget_s: float, modes=("fwd", "fwd+bwd"),
        only: list[str] | None = None, max_seconds: float | None = None, first: tuple[str, ...] = (),
        log=print) -> dict:
    """Run the grid (lengths in the given order: put the most important first when `max_seconds` may cut the run
    short; within a length, implementations whose name contains one of `first` run first); returns {"config",
    "notes", "peak_tflops", "rows": [cell dicts sorted by T, implementation, mode]}."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    impls, notes = implementations(device, shapes.W)
    if only:
        impls = [i for i in impls if any(o in i.name for o in only)]
    mem_limit = (0.35 if device == "gpu" else 0.4) * device_memory_bytes()
    peak = matmul_peak_tflops() if device == "gpu" else None
    rows, slow = [], {}
    for T in lengths:
        args, ct = make_inputs(shapes, T)
        for impl in sorted(impls, key=lambda i: not any(f in i.name for f in first)):
            for mode in modes:
                cell = dict(impl=impl.name, T=T, mode=mode)
                key = (impl.name, mode)
                need = quadratic_bytes(impl.kind, mode, shapes, T) if impl.quadratic else 0.0
                if deadline is not None and time.monotonic() > deadline:
                    cell["skip"] = f"not run: the benchmark's {max_seconds:.0f} s time limit was reached"
                elif need > mem_limit:
                    cell["skip"] = f"needs ~{need / 2**30:.0f} GiB of (T, T) maps (limit {mem_limit / 2**30:.0f} GiB)"
                elif key in slow:
                    cell["skip"] = (f"T={slow[key][0]} took {slow[key][1]:.1f} s per call; this length would exceed "
                                    f"the {budget_s:.0f} s budget")
                else:
                    try:
                        cell.update(time_cell(impl, mode, args, ct, reps, budget_s))
                    except Exception as err:  # noqa: BLE001 - a failing cell is reported, the grid continues
                        cell["skip"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                if "median_s" in cell:
                    cell["tokens_per_s"] = shapes.B * T / cell["median_s"]
                    flops = model_flops(impl.kind, shapes, T, backward=mode != "fwd")
                    cell["tflops"] = flops / cell["median_s"] / 1e12
                    growth = 4 if impl.quadratic else 2  # predicted cost of the next (2×) length
                    if cell["median_s"] * growth > budget_s:
                        slow[key] = (T, cell["median_s"])
                rows.append(cell)
                log(_cell_line(cell))
    order = {impl.name: i for i, impl in enumerate(impls)}
    rows.sort(key=lambda c: (c["T"], order[c["impl"]], c["mode"] != "fwd"))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(config=dict(device=device, jax=jax.__version__, backend=jax.default_backend(),
                            device_kind=jax.devices()[0].device_kind, cpu_count=os.cpu_count(), load_avg_end=load,
                            reps=reps, **dataclasses.asdict(shapes)),
                notes=notes, peak_tflops=peak, rows=rows)


def _cell_line(c: dict) -> str:
    if "skip" in c:
        return f"{c['impl']:>22} T={c['T']:>6} {c['mode']:>8}: skipped ({c['skip']})"
    return (f"{c['impl']:>22} T={c['T']:>6} {c['mode']:>8}: {c['median_s'] * 1e3:10.2f} ms  "
            f"{c['tokens_per_s']:12.0f} tok/s  compile {c['compile_s']:.1f} s")


def scaling_summary(result: dict) -> list[str]:
    """time(T_max) / time(T_min) per implementation and mode, from medians and from minima (the minimum is the
    steadier statistic on a shared machine). Linear-time target on CPU: ≤ 24× from 1K to 16K."""
    out = []
    by_key: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for c in result["rows"]:
        if "median_s" in c:
            by_key.setdefault((c["impl"], c["mode"]), {})[c["T"]] = (c["median_s"], c["min_s"])
    for (impl, mode), t in by_key.items():
        if len(t) >= 2:
            lo, hi = min(t), max(t)
            out.append(f"- {impl} {mode}: time({hi}) / time({lo}) = {t[hi][0] / t[lo][0]:.1f}× median, "
                       f"{t[hi][1] / t[lo][1]:.1f}× min (length ratio {hi // lo}×)")
    return out


def to_markdown(result: dict) -> str:
    cfg, peak = result["config"], result["peak_tflops"]
    lines = [f"# Attention benchmark ({cfg['device']}: {cfg['device_kind']}, jax {cfg['jax']})", "",
             f"B={cfg['B']} H={cfg['H']} K={cfg.get('K') or cfg['H']} D={cfg['D']} F={cfg['F']} (F'={2 * cfg['F']}) "
             f"W={cfg['W']} "
             f"dtype={cfg['dtype']}; median (and min) of up to {cfg['reps']} runs after one warm-up (fewer when a "
             "call is long); memory = compiled temp + output bytes (XLA memory analysis)."
             + (f" Measured bf16 matmul peak: {peak:.0f} TFLOP/s." if peak else "")
             + (f" Host: {cfg['cpu_count']} CPUs, load average at the end {cfg['load_avg_end'][0]:.1f} (other jobs "
                "share the machine when it exceeds the CPU count: timings are then noisy)."
                if cfg["device"] == "cpu" and cfg.get("load_avg_end") else ""),
             ""]
    head = "| implementation | T | mode | median ms | min ms | tokens/s | memory MiB | compile s |"
    sep = "|---|---:|---|---:|---:|---:|---:|---:|"
    if peak:
        head, sep = head + " TFLOP/s | % of peak |", sep + "---:|---:|"
    lines += [head, sep]
    for c in result["rows"]:
        if "skip" in c:
            lines.append(f"| {c['impl']} | {c['T']} | {c['mode']} | skipped: {c['skip']} |")
            continue
        mem = "n/a" if c["mem_bytes"] is None else f"{c['mem_bytes'] / 2**20:.1f}"
        row = (f"| {c['impl']} | {c['T']} | {c['mode']} | {c['median_s'] * 1e3:.2f} | {c['min_s'] * 1e3:.2f} | "
               f"{c['tokens_per_s']:.0f} | "
               f"{mem} | {c['compile_s']:.1f} |")
        if peak:
            row += f" {c['tflops']:.1f} | {100 * c['tflops'] / peak:.0f} |"
        lines.append(row)
    lines += ["", "Scaling (longest / shortest measured length):", *scaling_summary(result)]
    if result["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def write(result: dict, out: str) -> None:
    """Markdown to `out` (a .md path, or any stem) and JSON beside it."""
    write_table(result, to_markdown(result), out)
