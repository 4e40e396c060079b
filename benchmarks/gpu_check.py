"""The GPU check of the LoLCATS attention kernels (run by benchmarks/gpu_check.sh on a machine with an NVIDIA GPU).

Six stages, each guarded (a failure is recorded and the next stage still runs), all written under --out:
  1. correctness: Pallas, Triton (forward; Pallas backward) and chunked backends vs the quadratic reference
     (float32 at "highest" matmul precision as ground truth): outputs and gradients wrt q, k, v, wq, wk, (bq, bk), θ
     with a random cotangent; sw / tk / linear, float32 and bfloat16, T not a multiple of the chunk, T = 1, T < W,
     several segments, a long case (T = 4096)  → correctness.md / .json
  2. tuning: Pallas hybrid-tk launch parameters tuned at the 8B training shape (kernels.lolcats.autotune) → tuning.md
  3. moe: Mixtral's grouped expert dispatch vs its dense definition, and one Mixtral-8x7B layer's experts timed
     (grouped GEMMs vs the dense all-expert product) → moe.md / .json (benchmarks/moe_check.py)
  4. benchmark: `lolcats_jax.bench.attention` with GPU defaults, 8K first, under a time limit → attention_gpu.md/.json
  5. fla: flash-linear-attention's chunked linear attention (PyTorch + Triton) at the benchmark's shapes, B = 1 and 8
     (benchmarks/fla_baseline.py, a subprocess) → fla_gpu.md / .json; its rows of the benchmark's batch are merged
     into attention_gpu.md / .json beside ours
  6. model: a Llama-3.1-8B-shaped model (random bf16 weights, the 8B recipe's attention): distill and LoRA train
     steps, prefill / decode and the largest decode batch per context, linearized vs softmax teacher
     (benchmarks/gpu_model_check.py, a subprocess) → model_gpu.md / .json
Every stage has a time limit (--STAGE-seconds; --total-seconds caps the whole run, see `planned_seconds`);
status.json is rewritten as stages start and end, so a run cut short shows where. Exit status 0 only if every
stage passed.
Shapes: B batch, T tokens, H heads, D head dim, F feature dim (F' = 2F), W window (see kernels/lolcats/spec.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import subprocess
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
    # grouped heads in float32: the θ gradient in bf16 is a sum of cancelling terms whose bf16 dot operands make it
    # noisy for some draws (Pallas, T=80 smoke shapes, seed 0: 0.105 relative with K=1 and 0.029 with K=H, the
    # chunked backend 0.001) — a precision property of the bf16 kernels, checked by the bf16 cases, not of grouping
    ("tk f32 T=1000 GQA H=8 K=2", dict(window="tk"), 1, 1000, 8, 2, 128, 64, "float32", {}),
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


def tuning(out_dir: str, max_seconds: float, T: int = 1024) -> None:
    """`kernels.lolcats.autotune` at the 8B training shape (B=1, H=32, K=8, D=128, F=64, tk 64, bf16, T=1024):
    coordinate descent from the defaults, forward + backward timed; the choice goes to out_dir/pallas_tuning.json,
    which the later stages of this process (the model stage) then launch with."""
    from kernels.lolcats import autotune

    shapes = bench.DEFAULTS["gpu"]["shapes"]
    if SMOKE:
        shapes, T = bench.Shapes(B=1, H=2, D=16, F=8, W=16, dtype="float32", K=2), 64
    os.environ[autotune.CACHE_ENV] = os.path.join(out_dir, "pallas_tuning.json")
    spec = LolcatsSpec(window="tk", window_size=shapes.W)
    res = autotune.tune(spec, shapes.B, T, shapes.H, shapes.kv_heads, shapes.D, shapes.F, None, shapes.dtype,
                        reps=10, budget_s=max_seconds)
    lines = [f"# Pallas hybrid-tk launch parameters at T={T} (B={shapes.B} H={shapes.H} K={shapes.kv_heads} "
             f"D={shapes.D} F={shapes.F} {shapes.dtype}), `kernels.lolcats.autotune`", "",
             "| config | fwd+bwd ms |", "|---|---:|"]
    for t in res["trials"]:
        lines.append(f"| {t['config']} | {t['ms']:.3f} |" if t["ms"] is not None else f"| {t['config']} | failed: {t['error']} |")
    lines += ["", f"chosen: {res['config']} — {res['ms']:.3f} ms vs {res['default_ms']:.3f} ms with the defaults "
              f"(key `{res['key']}`)"]
    print("\n".join(lines), flush=True)
    with open(os.path.join(out_dir, "tuning.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


STAGES = ("correctness", "tuning", "moe", "bench", "fla", "model")  # in this order
# Seconds per stage inside gpu_check.sh's `timeout 570` (the device tool allows 600 s a command; the wheel installs
# and nvidia-smi come first). ~15 s of Python/JAX start-up, then: correctness 110 (its cases most important first),
# tuning 30 (the defaults and 3-5 alternatives at T=1K; none started after the limit), moe ~25 (no limit of its
# own: planned here), bench 140 (the 8K rows first, then the extremes), fla 75 (torch + fla import ~10 s and fla's Triton autotuning ~30 s on the first cells,
# then ~1 s a cell), model 160 (8B init ~10 s, two train-step compiles ~30 s each, then generation cells of ~15-25 s,
# 32K and 1K first): 540 s, under gpu_check.sh's --total-seconds 550.
MOE_PLANNED_S = 25.0


def planned_seconds(stage: str, planned: dict[str, float], todo: list[str], t_end: float) -> float:
    """The time `stage` may take: its planned seconds, shortened when the stages before it overran (a cell in flight
    at a limit is finished) so that the stages after it keep theirs within the total."""
    later = sum(planned[s] for s in todo[todo.index(stage) + 1:])
    return max(0.0, min(planned[stage], t_end - time.monotonic() - later))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--correctness-seconds", type=float, default=110.0)
    parser.add_argument("--tuning-seconds", type=float, default=30.0)
    parser.add_argument("--bench-seconds", type=float, default=140.0)
    parser.add_argument("--fla-seconds", type=float, default=75.0)
    parser.add_argument("--model-seconds", type=float, default=160.0)
    parser.add_argument("--total-seconds", type=float, default=math.inf,
                        help="the whole run's limit: a stage gets less than its own when earlier ones overran")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(STAGES))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes + interpret mode, to test this script")
    args = parser.parse_args(argv)
    t_end = time.monotonic() + args.total_seconds
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
    for dist in ("torch", "fla-core", "einops"):  # the fla stage's; not imported here (torch stays out of this process)
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = "not installed"
    print(json.dumps(env, indent=1), flush=True)
    with open(os.path.join(args.out, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    if jax.default_backend() != "gpu" and not SMOKE:
        print(f"no GPU: JAX backend is {jax.default_backend()!r}", file=sys.stderr)
        return 2
    todo = [s for s in STAGES if s not in args.skip]
    planned = dict(correctness=args.correctness_seconds, tuning=args.tuning_seconds, moe=MOE_PLANNED_S,
                   bench=args.bench_seconds, fla=args.fla_seconds, model=args.model_seconds)
    run = dict(correctness=lambda s: correctness(args.out, s), tuning=lambda s: tuning(args.out, s),
               moe=lambda s: _moe(args.out), bench=lambda s: _bench(args.out, s), fla=lambda s: _fla(args.out, s),
               model=lambda s: _model(args.out, s))
    status, ok = {stage: "not started" for stage in todo}, True
    for stage in todo:
        seconds = planned_seconds(stage, planned, todo, t_end)
        status[stage] = (f"running since {time.strftime('%H:%M:%S')}, limit {seconds:.0f} s (if the run is over, it "
                         "was cut short here)")
        _write_status(args.out, status)
        t0 = time.perf_counter()
        try:
            passed = run[stage](seconds)
            status[stage] = "FAIL or incomplete (see its report)" if passed is False else "done"
        except Exception as err:  # noqa: BLE001 - later stages still run
            traceback.print_exc()
            status[stage] = f"error: {type(err).__name__}: {err}"[:500]
        ok &= status[stage] == "done"
        print(f"== {stage}: {status[stage]} ({time.perf_counter() - t0:.0f} s of {seconds:.0f})", flush=True)
        _write_status(args.out, status)
    return 0 if ok else 1


def _write_status(out_dir: str, status: dict) -> None:
    from lolcats_jax.fsio import write_text_atomic

    write_text_atomic(os.path.join(out_dir, "status.json"), json.dumps(status, indent=1))


def _moe(out_dir: str) -> bool:
    from moe_check import moe_stage

    return moe_stage(out_dir, SMOKE)


BENCH_ROWS = ["tk pallas", "linear pallas", "softmax cudnn", "tk triton", "tk chunked", "linear chunked",
              "softmax xla", "tk reference"]  # the sw rows are left to correctness to save GPU time
BENCH_LENGTHS = [8192, 1024, 65536, 4096, 16384, 2048, 32768]  # the 8K targets first, then the extremes
SMOKE_SHAPES = bench.Shapes(B=1, H=2, D=16, F=8, W=16, dtype="float32")  # the bench and fla stages' --cpu-smoke


def _bench(out_dir: str, seconds: float) -> bool:
    """The attention benchmark; False (the stage is reported failed) if any cell failed to run."""
    d = bench.DEFAULTS["gpu"]
    device, shapes, lengths = "gpu", d["shapes"], BENCH_LENGTHS
    if SMOKE:
        device, shapes, lengths = "cpu", SMOKE_SHAPES, [256, 128]
    result = bench.run(device, shapes, lengths, d["reps"], d["budget_s"], only=BENCH_ROWS, max_seconds=seconds,
                       first=("tk pallas", "linear pallas", "cudnn", "triton"))
    bench.write(result, os.path.join(out_dir, "attention_gpu"))
    print(bench.to_markdown(result), flush=True)
    failed = [f"{r.get('impl')} {r.get('mode')} T={r.get('T')}" for r in result["rows"]
              if str(r.get("skip", "")).startswith("failed")]
    for name in failed:
        print(f"== bench cell FAILED: {name}", file=sys.stderr, flush=True)
    return not failed


FLA_BATCHES = [1, 8]
FLA_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
CHILD_GRACE_S = {"fla": 15.0, "model": 30.0}  # a subprocess stage starts no cell in its last seconds: the grace
# lets the cell in flight finish before the kill at the stage's limit
_released = False


def _release_device_memory() -> None:
    """Before the first subprocess stage: delete this process's live arrays and drop its JAX backends, so that the
    device memory the earlier stages' allocator holds goes back to the device (this process computes nothing more)."""
    global _released
    if _released:
        return
    _released = True
    arrays = jax.live_arrays()
    held = sum(a.nbytes for a in arrays)
    try:
        for a in arrays:
            a.delete()
        jax.clear_caches()
        from jax.extend.backend import clear_backends

        clear_backends()
        print(f"== released {len(arrays)} arrays ({held / 2**30:.2f} GiB) and the JAX backends of this process",
              flush=True)
    except Exception as err:  # noqa: BLE001 - the stages still run, with less free memory
        traceback.print_exc()
        print(f"== WARNING: could not release this process's device memory ({type(err).__name__}: {err}); the "
              "subprocess stages get what is left", file=sys.stderr, flush=True)


def _child(name: str, script: str, argv: list[str], seconds: float, env: dict | None = None) -> bool:
    """benchmarks/`script` in a subprocess told to start no cell after `seconds` − its grace and killed at `seconds`;
    True iff it exited 0 (its output goes to this process's, i.e. gpu_check.log)."""
    grace = CHILD_GRACE_S[name]
    if seconds < grace + 10:
        print(f"== {name}: not run: only {seconds:.0f} s left for it", file=sys.stderr, flush=True)
        return False
    _release_device_memory()
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), *argv, "--seconds", f"{seconds - grace:.0f}"]
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    try:
        rc = subprocess.run(cmd, timeout=seconds, env=env).returncode
    except subprocess.TimeoutExpired:
        print(f"== {name}: KILLED at its {seconds:.0f} s limit (its report keeps the cells it finished)",
              file=sys.stderr, flush=True)
        return False
    if rc:
        print(f"== {name}: {script} exited with status {rc}", file=sys.stderr, flush=True)
    return rc == 0


def _fla(out_dir: str, seconds: float) -> bool:
    """fla's rows (benchmarks/fla_baseline.py), then fla_gpu.md and the merge into attention_gpu. False if fla did not
    run (no CUDA, not importable), a parity check or a cell failed, or the subprocess was killed."""
    s = SMOKE_SHAPES if SMOKE else bench.DEFAULTS["gpu"]["shapes"]
    batches, lengths = ([1, 2], [128, 256]) if SMOKE else (FLA_BATCHES, FLA_LENGTHS)
    argv = ["--out", out_dir, "--batches", *map(str, batches), "--lengths", *map(str, lengths), "--H", str(s.H),
            "--K", str(s.kv_heads), "--D", str(s.D), "--feature-dim", str(2 * s.F), "--W", str(s.W),
            "--reps", str(2 if SMOKE else bench.DEFAULTS["gpu"]["reps"]), *(["--smoke"] if SMOKE else [])]
    ran = _child("fla", "fla_baseline.py", argv, seconds)
    path = os.path.join(out_dir, "fla_gpu.json")
    if not os.path.exists(path):
        print("== fla: fla_baseline.py wrote no fla_gpu.json", file=sys.stderr, flush=True)
        return False
    with open(path) as f:
        fla = json.load(f)
    merged = merge_fla_rows(out_dir, fla)
    from lolcats_jax.fsio import write_text_atomic

    write_text_atomic(os.path.join(out_dir, "fla_gpu.md"), fla_markdown(fla, merged))
    print(merged, flush=True)
    return ran


def fla_flops(impl: str, shapes: bench.Shapes, T: int, backward: bool) -> float:
    """Nominal FLOPs of an fla row: `bench.model_flops` of the same algorithm (linear; hybrid for the window proxy)
    less the feature maps (2·2·T·D·F per head, 3.5× with the backward), which fla takes already applied."""
    kind = "hybrid" if impl.startswith("fla linear+window") else "linear"
    maps = shapes.B * shapes.H * T * 4.0 * shapes.D * shapes.F * (3.5 if backward else 1.0)
    return bench.model_flops(kind, shapes, T, backward=backward) - maps


def _fla_row(row: dict, shapes: bench.Shapes) -> dict:
    """An fla_gpu.json row as an attention-benchmark row (its TFLOP/s by `fla_flops`), marked as fla's."""
    out = dict(row, source="fla_gpu.json")
    if "median_s" in row:
        out["tflops"] = fla_flops(row["impl"], shapes, row["T"], row["mode"] != "fwd") / row["median_s"] / 1e12
    return out


def _fla_shapes(c: dict, B: int) -> bench.Shapes:
    return bench.Shapes(B=B, H=c["H"], D=c["D"], F=c["F"], W=c["W"], dtype=c["dtype"], K=c["K"])


def merge_fla_rows(out_dir: str, fla: dict) -> str:
    """Puts fla's rows of the benchmark's batch and shapes into attention_gpu.md / .json beside ours (replacing rows
    merged before); returns a line saying what was merged, or why nothing was."""
    path = os.path.join(out_dir, "attention_gpu.json")
    if not os.path.exists(path):
        return "fla rows not merged into attention_gpu: the benchmark wrote no attention_gpu.json"
    with open(path) as f:
        result = json.load(f)
    cfg, c = result["config"], fla["config"]
    ours = (cfg["H"], cfg.get("K") or cfg["H"], cfg["D"], cfg["F"], cfg["W"], cfg["dtype"])
    theirs = (c["H"], c["K"], c["D"], c["F"], c["W"], c["dtype"])
    if ours != theirs or cfg["B"] not in c["batches"]:
        return f"fla rows not merged into attention_gpu: shapes (H, K, D, F, W, dtype) {theirs} B={c['batches']} " \
               f"differ from the benchmark's {ours} B={cfg['B']}"
    shapes = _fla_shapes(c, cfg["B"])
    rows = [_fla_row(r, shapes) for r in fla["rows"] if r["B"] == cfg["B"]]
    kept = [r for r in result["rows"] if r.get("source") != "fla_gpu.json"]
    result["rows"] = sorted(kept + rows, key=lambda r: r["T"])  # stable: ours first at each T, as ordered before
    note = ("fla rows (from fla_gpu.json, see fla_gpu.md): PyTorch + Triton, CUDA-event timings; q, k enter after "
            "the feature maps (not timed), v repeated to H heads; memory = torch's peak allocation above the inputs")
    result["notes"] = [n for n in result["notes"] if not n.startswith("fla rows")] + [note]
    bench.write(result, os.path.join(out_dir, "attention_gpu"))
    return f"fla: {len(rows)} rows of B={cfg['B']} merged into attention_gpu.md / .json"


def fla_markdown(fla: dict, merged: str) -> str:
    """fla_gpu.md: the parity checks, then one table per batch in the attention benchmark's format."""
    c = fla["config"]
    versions = ", ".join(f"{k} {v}" for k, v in c["versions"].items()) or "no torch"
    lines = [f"# fla baseline ({c['device']}: {c.get('device_kind', 'n/a')}; {versions})", ""]
    if c["unavailable"]:
        lines += [f"**fla not run: {c['unavailable']}** — the stage is incomplete.", ""]
    lines += [f"H={c['H']} K={c['K']} D={c['D']} F'={2 * c['F']} (fla takes q, k after the feature maps) W={c['W']} "
              f"dtype={c['dtype']}; median (and min) of up to {c['reps']} calls timed with "
              + ("CUDA events" if c["device"] == "gpu" else "the host clock (CPU smoke)")
              + " after a first call (compile s: Triton compilation and autotuning); memory = torch's peak allocation "
              "during one call above the inputs; TFLOP/s of the nominal FLOPs of our same-named algorithm less the "
              "feature maps."
              + (f" Measured bf16 torch matmul peak: {fla['peak_tflops']:.0f} TFLOP/s." if fla["peak_tflops"] else ""),
              "", merged, *[f"- {n}" for n in fla["notes"]], "",
              "Parity vs the float32 definition (benchmarks/fla_baseline.py):", ""]
    for p in fla["parity"]:
        verdict = "ok" if p["pass"] else "FAIL"
        detail = p.get("error") or f"rel RMS {p['rel_rms']:.1e} ({p['dtype']}, tol {p['tol']:.0e}, T={p['T']})"
        lines.append(f"- {p['impl']}: {detail}: {verdict}")
    for B in c["batches"]:
        shapes = _fla_shapes(c, B)
        result = dict(config=dict(device=c["device"], device_kind=c.get("device_kind", "n/a"), jax="n/a",
                                  reps=c["reps"], cpu_count=os.cpu_count(), load_avg_end=None,
                                  **dataclasses.asdict(shapes)),
                      notes=[], peak_tflops=fla["peak_tflops"],
                      rows=[_fla_row(r, shapes) for r in fla["rows"] if r["B"] == B])
        md = bench.to_markdown(result)
        lines += ["", f"## B={B}", "", md[md.index("| implementation |"):].rstrip()]
    return "\n".join(lines) + "\n"


def _model(out_dir: str, seconds: float) -> bool:
    """The 8B-shaped model stage (benchmarks/gpu_model_check.py); False if a cell failed for another reason than
    memory, or the subprocess was killed."""
    env = dict(os.environ)
    if not SMOKE and not {"XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"} & set(env):
        env["XLA_CLIENT_MEM_FRACTION"] = "0.92"  # alone on the device: XLA's allocator may grow past its default 75 %
    return _child("model", "gpu_model_check.py", ["--out", out_dir, *(["--smoke"] if SMOKE else [])], seconds, env)


if __name__ == "__main__":
    sys.exit(main())
