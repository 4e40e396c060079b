"""Timing an attention call on the device, and the random inputs it is timed with: shared by the autotuner
(`kernels.lolcats.autotune`) and the attention benchmark (`lolcats_jax.bench.attention`), so both measure alike.

Shapes: q [B, T, H, D]; k, v [B, T, K, D] / [B, T, K, Dv]; feature-map weights (H, D, F); θ (H,).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kernels.lolcats.feature_maps import DEFAULT_WINDOW_LOGIT
from kernels.lolcats.spec import FeatureMapParams


def random_inputs(B: int, T: int, H: int, K: int, D: int, F: int, dtype, Dv: int | None = None, seed: int = 0):
    """((q, k, v, fmap, θ), ct): normal q/k/v in `dtype`, fp32 feature maps scaled by 1/√D, θ at its init value, and a
    cotangent ct shaped like the output [B, T, H, Dv] for a forward+backward timing."""
    Dv = Dv or D
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    dt = jnp.dtype(dtype)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dt)
    k = jax.random.normal(ks[1], (B, T, K, D), jnp.float32).astype(dt)
    v = jax.random.normal(ks[2], (B, T, K, Dv), jnp.float32).astype(dt)
    wq, wk = (jax.random.normal(kk, (H, D, F), jnp.float32) / D**0.5 for kk in ks[3:5])
    theta = jnp.full((H,), DEFAULT_WINDOW_LOGIT, jnp.float32)
    ct = jax.random.normal(ks[5], (B, T, H, Dv), jnp.float32).astype(dt)
    return (q, k, v, FeatureMapParams(wq, wk, None, None), theta), ct


def time_jitted(fn: Callable, args: tuple[Any, ...], reps: int, budget_s: float = float("inf")) -> dict:
    """Compiles the jitted `fn` for `args`, runs it once to warm up, then times up to `reps` runs (fewer if they would
    exceed `budget_s`). Returns median_s, min_s, compile_s, mem_bytes (compiled temp + output; None where the
    backend does not say) and runs (how many were timed)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    mem_bytes = None if mem is None else int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    warm_s = time.perf_counter() - t0
    times = []
    n = reps if budget_s == float("inf") else max(1, min(reps, int(budget_s / max(warm_s, 1e-9))))
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return dict(median_s=statistics.median(times), min_s=min(times), compile_s=compile_s, mem_bytes=mem_bytes,
                runs=len(times))
