"""The GPU check of the LoLCATS attention kernels (run by benchmarks/gpu_check.sh on a machine with an NVIDIA GPU).

Four stages, each guarded (a failure is recorded and the next stage still runs), all written under --out:
  1. correctness: Pallas, Triton (forward; Pallas backward) and chunked backends vs the quadratic reference
     (float32 at "highest" matmul precision as ground truth): outputs and gradients wrt q, k, v, wq, wk, (bq, bk), θ
     with a random cotangent; sw / tk / linear, float32 and bfloat16, T not a multiple of the chunk, T = 1, T < W,
     several segments, a long case (T = 4096)  → correctness.md / .json
  2. tuning: Pallas hybrid-tk at T = 8192 (B=1, H=32, D=128, F=64, bf16) for a few PallasConfig variants → tuning.md
  3. moe: Mixtral's grouped expert dispatch vs its dense definition, and one Mixtral-8x7B layer's experts timed
     (grouped GEMMs vs the dense all-expert product) → moe.md / .json (benchmarks/moe_check.py)
  4. benchmark: `lolcats_jax.bench.attention` with GPU defaults, 8K first, under a time limit → attention_gpu.md/.json
Shapes: B batch, T tokens, H heads, D head dim, F feature dim (F' = 2F), W window (see kernels/lolcats/spec.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "kernels")]

from lolcats_testutil import cast_tree, grad_errors, make_inputs, rel_rms  # noqa: E402

from kernels.lolcats import Backend, LolcatsSpec, key_set_masks, lolcats_attention  # noqa: E402
from kernels.lolcats.pallas_hybrid import PallasConfig, pallas_lolcats_attention  # noqa: E402
from lolcats_jax.bench import attention as bench  # noqa: E402

SMOKE = False  # --cpu-smoke: tiny shapes, Pallas in interpret mode; exercises this script on a CPU machine
TOL = {"float32": (1e-4, 1e-4, 1e-3), "bfloat16": (2e-2, 3e-2, 5e-2)}  # (output, gradients, θ)

CASES = [  # (name, spec kwargs, B, T, H, K, D, F, dtype, PallasConfig kwargs), most important first; K kv heads
    ("tk bf16 T=1000", dict(window="tk"), 2, 1000, 4, 4, 128, 64, "bfloat16", {}),
    ("tk bf16 T=1000 GQA H=8 K=2", dict(window="tk"), 1, 1000, 8, 2, 128, 64, "bfloat16", {}),
    ("tk f32 T=1000 4 segments", dict(window="tk"), 2, 1000, 4, 4, 128, 64, "float32", dict(seg_chunks=4)),
    ("sw f32 T=1000 4 segments GQA H=4 K=1", dict(window="sw"), 2, 1000, 4, 1, 128, 64, "float32",
     dict(seg_chunks=4)),
    ("linear bf16 T=1000 4 segments", dict(form="linear"), 2, 1000, 4, 4, 128, 64, "bfloat16", dict(seg_chunks=4)),
    ("tk bf16 T=4096 long", dict(window="tk"), 1, 4096, 4, 4, 128, 64, "bfloat16", {}),
    ("tk f32 T=37 < W", dict(window="tk"), 1, 37, 4, 4, 128, 64, "float32", {}),
    ("tk W=16 C=64 relu+bias f32 T=300", dict(window="tk", window_size=16, feature_map="relu"), 1, 300, 2, 2, 64, 32,
     "float32", dict(seg_chunks=2)),
    ("sw exp_dim affine f32 T=300", dict(window="sw", feature_map="exp_dim", affine=True), 1, 300, 2, 2, 64, 32,
     "float32", dict(seg_chunks=2)),
]


def _output_and_grads(fn, inputs, ct_dtype):
    @jax.jit
    def run(inputs):
        y, vjp = jax.vjp(fn, *inputs)
        ct = jax.random.normal(jax.random.PRNGKey(0), y.shape, jnp.float32).astype(ct_dtype).astype(y.dtype)
        return y, vjp(ct)

    return jax.block_until_ready(run(inputs))


def _triton_available() -> str | None:
    """None if the Triton backend can run here, else why not (then its rows are reported, not failed)."""
    if SMOKE or jax.default_backend() != "gpu":
        return f"no GPU (backend {jax.default_backend()!r})"
    try:
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import problem means "unavailable"
        return f"{type(err).__name__}: {err}"
    return None


def _backends(spec: LolcatsSpec, cfg: dict, with_triton: bool):
    cfg = {**cfg, "interpret": SMOKE}
    fns = {"chunked": lambda *a: lolcats_attention(*a, spec, backend=Backend.CHUNKED),
           "pallas": lambda *a: pallas_lolcats_attention(*a, spec, PallasConfig(**cfg))}
    if with_triton and spec.feature_map == "softmax_dim" and spec.form in ("hybrid", "linear"):
        from kernels.lolcats.triton_hybrid import triton_lolcats_attention

        fns["triton"] = lambda *a: triton_lolcats_attention(*a, spec, PallasConfig(**cfg))
    return fns


def correctness(out_dir: str, max_seconds: float) -> bool:
    results, ok = [], True
    deadline = time.monotonic() + max_seconds
    triton_missing = _triton_available()
    if triton_missing:  # an unavailable backend is not a passed one: the stage reports itself incomplete
        results.append({"case": "all", "backend": "triton", "pass": False, "not_run": True, "seconds": 0.0,
                        "error": f"not run (unavailable): {triton_missing}"})
        ok = False
    for name, kw, B, T, H, K, D, F, dtype, cfg in CASES:
        if time.monotonic() > deadline:  # counts as not passed: the check is incomplete
            results.append({"case": name, "backend": "all", "pass": False, "not_run": True, "seconds": 0.0,
                            "error": f"not run: the correctness stage's {max_seconds:.0f} s limit was reached"})
            ok = False
            continue
        if SMOKE:
            T, H, K, D, F, kw = min(T, 80), 2, 1 if K < H else 2, 16, 8, {"window_size": 16, **kw}
        spec = LolcatsSpec(**{"window_size": 64, **kw})
        bias = spec.feature_map in ("relu", "pos_elu")
        inputs = make_inputs(0, B, T, H, D, F, jnp.dtype(dtype), bias=bias, K=K)
        with jax.default_matmul_precision("highest"):
            truth = _output_and_grads(lambda *a: lolcats_attention(*a, spec, backend=Backend.REFERENCE),
                                      cast_tree(inputs, jnp.float32), jnp.dtype(dtype))
        tol_y, tol_g, tol_theta = TOL[dtype]
        for backend, fn in _backends(spec, cfg, triton_missing is None).items():
            row = dict(case=name, backend=backend)
            t0 = time.perf_counter()
            try:
                prec = jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
                with prec:
                    y, grads = _output_and_grads(fn, inputs, jnp.dtype(dtype))
                errs = grad_errors(grads, truth[1])
                theta = errs.pop("theta", 0.0) if spec.form == "hybrid" else 0.0
                row.update(y=rel_rms(y, truth[0]), grads=max(errs.values()), theta=theta, per_grad=errs,
                           finite=bool(all(np.isfinite(np.asarray(g, np.float32)).all()
                                           for g in jax.tree.leaves(grads))))
                # without linear pairs γ cancels (dθ = 0 up to rounding): θ is then not compared
                no_linear = not key_set_masks(min(T, 4 * spec.window_size), spec)[1].any()
                row["pass"] = bool(row["finite"] and row["y"] < tol_y and row["grads"] < tol_g
                                   and (row["theta"] < tol_theta or no_linear))
            except Exception as err:  # noqa: BLE001 - record and continue with the next backend
                row.update({"pass": False, "error": f"{type(err).__name__}: {err}"[:2000]})
                traceback.print_exc()
            row["seconds"] = time.perf_counter() - t0
            ok &= row["pass"]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_grad"}), flush=True)
            _write_correctness(out_dir, results)  # cell by cell: a run cut short keeps what it measured
    _write_correctness(out_dir, results)
    return ok


def _write_correctness(out_dir: str, results: list[dict]) -> None:
    """correctness.json and correctness.md of the rows so far (each file written whole, then renamed)."""
    from lolcats_jax.fsio import write_text_atomic

    write_text_atomic(os.path.join(out_dir, "correctness.json"), json.dumps(results, indent=1))
    lines = ["# GPU correctness vs the float32 reference (relative RMS)", "",
             f"Tolerances (output, gradients, θ): {TOL}", "",
             "| case | backend | y | worst grad | θ grad | pass | s |", "|---|---|---:|---:|---:|---|---:|"]
    for r in results:
        if "error" in r:
            verdict = "n/a" if r["pass"] else ("not run" if r.get("not_run") else "FAIL")
            lines.append(f"| {r['case']} | {r['backend']} | {r['error'][:200]} | | | {verdict} | {r['seconds']:.1f} |")
        else:
            lines.append(f"| {r['case']} | {r['backend']} | {r['y']:.1e} | {r['grads']:.1e} | {r['theta']:.1e} | "
                         f"{'ok' if r['pass'] else 'FAIL'} | {r['seconds']:.1f} |")
    write_text_atomic(os.path.join(out_dir, "correctness.md"), "\n".join(lines) + "\n")


TUNING = [PallasConfig(), PallasConfig(num_warps_fwd=8, num_warps_bwd=4), PallasConfig(block_v=128, num_warps_fwd=8),
          PallasConfig(seg_chunks=32)]  # in this order until the stage's time limit


def tuning(out_dir: str, max_seconds: float, T: int = 8192) -> None:
    shapes = bench.DEFAULTS["gpu"]["shapes"]
    if SMOKE:
        shapes, T = bench.Shapes(B=1, H=2, D=16, F=8, W=16, dtype="float32"), 256
    args, ct = bench.make_inputs(shapes, T)
    spec = LolcatsSpec(window="tk", window_size=shapes.W)
    lines = [f"# Pallas hybrid-tk configurations at T={T} (B={shapes.B} H={shapes.H} D={shapes.D} F={shapes.F} "
             f"{shapes.dtype})", "", "| config | fwd ms | fwd+bwd ms |", "|---|---:|---:|"]
    deadline = time.monotonic() + max_seconds
    for cfg in TUNING:
        if time.monotonic() > deadline:
            lines.append(f"| {cfg} | not run: {max_seconds:.0f} s limit | |")
            continue
        fn = functools.partial(pallas_lolcats_attention, spec=spec, config=dataclasses.replace(cfg, interpret=SMOKE))
        impl = bench.Impl("pallas", "hybrid", lambda q, k, v, fmap, theta, fn=fn: fn(q, k, v, fmap, theta))
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            try:
                cells.append(f"{bench.time_cell(impl, mode, args, ct, reps=5, budget_s=10)['median_s'] * 1e3:.2f}")
            except Exception as err:  # noqa: BLE001
                cells.append(f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        lines.append(f"| {cfg} | {cells[0]} | {cells[1]} |")
        print(lines[-1], flush=True)
    with open(os.path.join(out_dir, "tuning.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--correctness-seconds", type=float, default=120.0)
    parser.add_argument("--tuning-seconds", type=float, default=60.0)
    parser.add_argument("--bench-seconds", type=float, default=240.0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["correctness", "tuning", "bench", "moe"])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes + interpret mode, to test this script")
    args = parser.parse_args(argv)
    global SMOKE
    SMOKE = args.cpu_smoke
    os.makedirs(args.out, exist_ok=True)
    env = dict(python=sys.version, jax=jax.__version__, devices=[str(d) for d in jax.devices()],
               backend=jax.default_backend())
    for mod in ("jaxlib", "triton", "jax_triton", "jaxtyping", "flax"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as err:  # noqa: BLE001
            env[mod] = f"not importable: {type(err).__name__}: {err}"
    print(json.dumps(env, indent=1), flush=True)
    with open(os.path.join(args.out, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    if jax.default_backend() != "gpu" and not SMOKE:
        print(f"no GPU: JAX backend is {jax.default_backend()!r}", file=sys.stderr)
        return 2
    status, ok = {}, True
    for stage, fn in (("correctness", lambda: correctness(args.out, args.correctness_seconds)),
                      ("tuning", lambda: tuning(args.out, args.tuning_seconds)),
                      ("moe", lambda: _moe(args.out)),
                      ("bench", lambda: _bench(args.out, args.bench_seconds))):
        if stage in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            passed = fn()
            status[stage] = "FAIL or incomplete (see its report)" if passed is False else "done"
        except Exception as err:  # noqa: BLE001 - later stages still run
            traceback.print_exc()
            status[stage] = f"error: {type(err).__name__}: {err}"[:500]
        ok &= status[stage] == "done"
        print(f"== {stage}: {status[stage]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    with open(os.path.join(args.out, "status.json"), "w") as f:
        json.dump(status, f, indent=1)
    return 0 if ok else 1


def _moe(out_dir: str) -> bool:
    from moe_check import moe_stage

    return moe_stage(out_dir, SMOKE)


BENCH_ROWS = ["tk pallas", "linear pallas", "softmax cudnn", "tk triton", "tk chunked", "linear chunked",
              "softmax xla", "tk reference"]  # the sw rows are left to correctness to save GPU time
BENCH_LENGTHS = [8192, 1024, 65536, 4096, 16384, 2048, 32768]  # the 8K targets first, then the extremes


def _bench(out_dir: str, seconds: float) -> bool:
    """The attention benchmark; False (the stage is reported failed) if any cell failed to run."""
    d = bench.DEFAULTS["gpu"]
    device, shapes, lengths = "gpu", d["shapes"], BENCH_LENGTHS
    if SMOKE:
        device, shapes, lengths = "cpu", bench.Shapes(B=1, H=2, D=16, F=8, W=16, dtype="float32"), [256, 128]
    result = bench.run(device, shapes, lengths, d["reps"], d["budget_s"], only=BENCH_ROWS, max_seconds=seconds,
                       first=("tk pallas", "linear pallas", "cudnn", "triton"))
    bench.write(result, os.path.join(out_dir, "attention_gpu"))
    print(bench.to_markdown(result), flush=True)
    failed = [f"{r.get('impl')} {r.get('mode')} T={r.get('T')}" for r in result["rows"]
              if str(r.get("skip", "")).startswith("failed")]
    for name in failed:
        print(f"== bench cell FAILED: {name}", file=sys.stderr, flush=True)
    return not failed


if __name__ == "__main__":
    sys.exit(main())
