"""The mixture-of-experts stage of the GPU check (benchmarks/gpu_check.py): Mixtral's grouped dispatch
(`lolcats_jax.model.moe.experts_local`, grouped GEMMs via `jax.lax.ragged_dot`) on the device.

  correctness  outputs and input gradients of the grouped dispatch vs a dense definition (every expert on every
               token, masked combine) in float32 at "highest" precision, float32 and bfloat16
  timing       one Mixtral-8x7B layer's experts (E=4096, M=14336, X=8, top 2) on N tokens, forward and
               forward+backward: grouped dispatch vs the dense all-expert product, and the grouped dispatch of
               one device of an expert-4 mesh (2 local experts: the rows routed elsewhere sort after the local
               groups — this row shows whether the grouped GEMM skips them, i.e. costs ~1/4 of all-local);
               TFLOP/s on the useful FLOPs (2·N·K·3·E·M forward, the local share for the last row)
               → moe.md / moe.json
Notation: N tokens, E hidden, M expert MLP hidden, X experts, K experts per token.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lolcats_jax.fsio import write_text_atomic
from lolcats_jax.model.moe import experts_local, route

TOL = {"float32": 1e-4, "bfloat16": 3e-2}  # relative RMS of outputs and gradients


def dense_experts(h_NE, idx_NK, w_NK, wg, wu, wd):
    """Every expert on every token, combined with the routing weights (zero for the experts not chosen)."""
    X = wg.shape[0]
    comb = jnp.sum(jax.nn.one_hot(idx_NK, X, dtype=jnp.float32) * w_NK[..., None], axis=1)  # (N, X)
    act = jax.nn.silu(jnp.einsum("ne,xem->xnm", h_NE, wg)) * jnp.einsum("ne,xem->xnm", h_NE, wu)
    out = jnp.einsum("xnm,xme->xne", act, wd).astype(jnp.float32)
    return jnp.einsum("nx,xne->ne", comb, out)


def _inputs(N, E, M, X, K, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    h = jax.random.normal(ks[0], (N, E), jnp.float32)
    router = jax.random.normal(ks[1], (E, X), jnp.float32) / np.sqrt(E)
    w, idx = route(h[None], router, K)
    wg = jax.random.normal(ks[2], (X, E, M), jnp.float32) / np.sqrt(E)
    wu = jax.random.normal(ks[3], (X, E, M), jnp.float32) / np.sqrt(E)
    wd = jax.random.normal(ks[4], (X, M, E), jnp.float32) / np.sqrt(M)
    cast = lambda a: a.astype(dtype)  # noqa: E731
    return cast(h), idx[0], w[0], cast(wg), cast(wu), cast(wd)


def _grouped(h, idx, w, wg, wu, wd):
    return experts_local(h, idx, w, {"w_gate": wg, "w_up": wu, "w_down": wd}, 0)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-30))


def correctness(smoke: bool) -> list[dict]:
    N, E, M, X, K = (64, 32, 48, 4, 2) if smoke else (512, 256, 512, 8, 2)
    rows = []
    for dtype in ("float32", "bfloat16"):
        h, idx, w, wg, wu, wd = _inputs(N, E, M, X, K, jnp.dtype(dtype))
        ct = jax.random.normal(jax.random.PRNGKey(1), (N, E), jnp.float32)
        f32 = [a.astype(jnp.float32) for a in (h, wg, wu, wd)]
        with jax.default_matmul_precision("highest"):
            y_ref, vjp_ref = jax.vjp(lambda h_: dense_experts(h_, idx, w, *f32[1:]), f32[0])
            (g_ref,) = vjp_ref(ct)
        y, vjp = jax.vjp(lambda h_: _grouped(h_, idx, w, wg, wu, wd), h)
        (g,) = vjp(ct)
        row = {"dtype": dtype, "N": N, "E": E, "M": M, "X": X, "K": K, "y": _rel(y, y_ref), "dh": _rel(g, g_ref)}
        row["pass"] = bool(row["y"] < TOL[dtype] and row["dh"] < TOL[dtype] and np.isfinite(np.asarray(g, np.float32)).all())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def timing(smoke: bool, N: int = 4096) -> list[dict]:
    E, M, X, K, dtype = (32, 48, 4, 2, jnp.float32) if smoke else (4096, 14336, 8, 2, jnp.bfloat16)
    N = 128 if smoke else N
    h, idx, w, wg, wu, wd = _inputs(N, E, M, X, K, dtype)
    useful = 2 * N * K * 3 * E * M
    share = X // 4  # a device of an expert-4 mesh holds experts [0, X/4): the others' rows are in the sort tail

    def one_device_of_four(h_, idx_, w_, wg_, wu_, wd_):
        return experts_local(h_, idx_, w_, {"w_gate": wg_[:share], "w_up": wu_[:share], "w_down": wd_[:share]}, 0)

    rows = []
    for name, impl, frac in (("grouped (ragged_dot)", _grouped, 1.0), ("dense all experts", dense_experts, 1.0),
                             (f"grouped, {share} of {X} experts local", one_device_of_four, share / X)):
        fwd = jax.jit(lambda h_, impl=impl: impl(h_, idx, w, wg, wu, wd))
        fwd_bwd = jax.jit(jax.grad(lambda h_, impl=impl: jnp.sum(impl(h_, idx, w, wg, wu, wd))))
        row = {"impl": name, "N": N, "E": E, "M": M, "X": X, "K": K, "dtype": jnp.dtype(dtype).name}
        for mode, fn, flops in (("fwd", fwd, useful * frac), ("fwd+bwd", fwd_bwd, 3 * useful * frac)):
            try:
                s = _time(fn, (h,), reps=3 if smoke else 10)
                row[f"{mode}_ms"], row[f"{mode}_tflops"] = s * 1e3, flops / s / 1e12
            except Exception as err:  # noqa: BLE001 - e.g. out of memory for the dense product
                row[f"{mode}_ms"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def moe_stage(out_dir: str, smoke: bool) -> bool:
    checks = correctness(smoke)
    times = timing(smoke)
    write_text_atomic(os.path.join(out_dir, "moe.json"), json.dumps({"correctness": checks, "timing": times}, indent=1))
    lines = ["# Mixture-of-experts dispatch on the device (`lolcats_jax.model.moe`)", "",
             f"Correctness vs the dense definition at float32 'highest' (relative RMS; tolerances {TOL}):", "",
             "| dtype | N, E, M, X, K | output | dL/dh | pass |", "|---|---|---:|---:|---|"]
    for r in checks:
        lines.append(f"| {r['dtype']} | {r['N']}, {r['E']}, {r['M']}, {r['X']}, {r['K']} | {r['y']:.1e} | {r['dh']:.1e} | "
                     f"{'ok' if r['pass'] else 'FAIL'} |")
    t = times[0]
    lines += ["", f"One layer's experts (E={t['E']}, M={t['M']}, X={t['X']}, top {t['K']}, {t['dtype']}; Mixtral-8x7B's "
              "on a GPU, tiny with --cpu-smoke; TFLOP/s of the useful FLOPs):", "",
              "| impl | N | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |", "|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in times:
        lines.append(f"| {r['impl']} | {r['N']} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_tflops', ''))} | "
                     f"{fmt(r.get('fwd+bwd_ms'))} | {fmt(r.get('fwd+bwd_tflops', ''))} |")
    write_text_atomic(os.path.join(out_dir, "moe.md"), "\n".join(lines) + "\n")
    return all(r["pass"] for r in checks) and all(isinstance(times[0].get(k), float) for k in ("fwd_ms", "fwd+bwd_ms"))
