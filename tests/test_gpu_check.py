"""benchmarks/gpu_check.py on the CPU (`--cpu-smoke`: tiny shapes, Pallas interpret mode): an unavailable backend is
not a pass — Triton leaves the correctness stage incomplete, fla (no CUDA) leaves the fla stage incomplete, and the
script exits 1 — while the backends that ran pass against the reference, the MoE stage passes, the 8B-shaped model
stage runs its train and generation cells on a tiny architecture, and every report is on disk. Then the pieces the
smoke cannot reach: fla rows merged beside ours, the decode batch search's out-of-memory path, the stage budgets."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `--cpu-smoke` run (bench skipped; tuning times only the defaults): (its exit status, status.json, its output
    directory)."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(out),
                          "--skip", "bench", "--correctness-seconds", "15", "--tuning-seconds", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env={**_env(), "PYTHONPATH": str(REPO)})
    status = json.loads((out / "status.json").read_text())
    assert res.returncode == 1, (status, res.stderr[-3000:])  # incomplete stages: never a pass
    return status, out


@pytest.mark.slow
def test_cpu_smoke_tuning_writes_the_cache_the_later_stages_read(smoke):
    status, out = smoke
    assert status["tuning"] == "done", status
    cache = json.loads((out / "pallas_tuning.json").read_text())
    (key, entry), = cache.items()
    assert key.startswith("cpu|float32|hybrid/tk16") and entry["default_ms"] > 0
    assert "chosen:" in (out / "tuning.md").read_text()


@pytest.mark.slow
def test_cpu_smoke_correctness_is_incomplete_without_triton(smoke):
    status, out = smoke
    rows = json.loads((out / "correctness.json").read_text())
    triton = [r for r in rows if r["backend"] == "triton"]
    assert triton and all(not r["pass"] for r in triton)  # jax_triton does not import on a CPU jaxlib
    measured = [r for r in rows if "y" in r]
    assert measured and all(r["pass"] for r in measured), [r for r in measured if not r["pass"]]
    assert status["correctness"].startswith("FAIL or incomplete"), status
    assert "not run (unavailable)" in (out / "correctness.md").read_text()
    # the MoE stage: grouped expert dispatch vs its dense definition (and timed) on whatever device runs it
    assert status["moe"] == "done", status
    assert all(r["pass"] for r in json.loads((out / "moe.json").read_text())["correctness"])


@pytest.mark.slow
def test_cpu_smoke_fla_is_incomplete_without_cuda(smoke):
    """Every fla cell is "not run (no CUDA)" and the stage is incomplete; the stand-in rows ran through the same
    timing and reporting code."""
    status, out = smoke
    assert status["fla"].startswith("FAIL or incomplete"), status
    fla = json.loads((out / "fla_gpu.json").read_text())
    fla_rows = [r for r in fla["rows"] if r["impl"].startswith("fla ")]
    assert {(r["B"], r["T"], r["mode"]) for r in fla_rows} == {(B, T, m) for B in (1, 2) for T in (128, 256)
                                                               for m in ("fwd", "fwd+bwd")}
    assert all(r["skip"].startswith("not run (no CUDA") for r in fla_rows)
    stand_in = [r for r in fla["rows"] if not r["impl"].startswith("fla ")]
    assert len(stand_in) == 8 and all(r["median_s"] > 0 and r["tokens_per_s"] > 0 for r in stand_in)
    fla_md = (out / "fla_gpu.md").read_text()
    assert "fla not run: no CUDA" in fla_md and "## B=2" in fla_md
    assert "| fla chunk_linear_attn | 128 | fwd | skipped: not run (no CUDA" in fla_md


@pytest.mark.slow
def test_cpu_smoke_model_stage_on_a_tiny_architecture(smoke):
    """Train steps and generation of both models, with tokens/s and batch columns, from the 8B stage's code."""
    status, out = smoke
    assert status["model"] == "done", status
    model = json.loads((out / "model_gpu.json").read_text())
    assert model["config"]["attention_backend"] == "auto -> chunked" and model["config"]["arch"]["num_layers"] == 2
    train = {r["stage"]: r for r in model["train"]}
    assert set(train) == {"distill", "finetune"}
    for r in train.values():
        assert r["status"] == "ran" and r["tokens"] == r["A"] * r["B"] * 64 and math.isfinite(r["first_loss"])
        assert math.isclose(r["tokens_per_s"], r["tokens"] / r["step_s_median"], rel_tol=1e-6)
    cells = {(r["model"], r["T"], r["B"]): r for r in model["generate"]}
    assert set(cells) == {(m, T, B) for m in ("linearized", "teacher") for T in (64, 128) for B in (1, 4)}
    for (name, T, B), r in cells.items():
        assert r["status"] == "ran" and r["decode_tok_s"] > 0 and r["cache_bytes"] > 0
        assert ("prefill_tok_s" in r) == (B == 1)
        assert r["cache_bytes"] == B * cells[(name, T, 1)]["cache_bytes"]  # the prompt's cache on B rows
    # the linearized state does not grow with T; the teacher's KV cache does
    assert cells[("linearized", 64, 1)]["cache_bytes"] == cells[("linearized", 128, 1)]["cache_bytes"]
    assert cells[("teacher", 64, 1)]["cache_bytes"] < cells[("teacher", 128, 1)]["cache_bytes"]
    assert {(s["model"], s["T"], s["largest_B"], s["stopped"]) for s in model["search"]} == \
        {(m, T, 4, "max_batch=4 reached") for m in ("linearized", "teacher") for T in (64, 128)}
    md = (out / "model_gpu.md").read_text()
    for header in ("| stage | T | B | A | tokens/step |", "| tokens/s |", "| model | layers | T | B | prefill tok/s |",
                   "| decode tok/s |", "| model | T | largest B | decode tok/s at it |"):
        assert header in md, header


def test_fla_rows_merge_beside_ours(tmp_path):
    """fla's rows of the benchmark's batch join attention_gpu.md / .json after ours at each T (again: replaced, not
    duplicated), with TFLOP/s of our nominal FLOPs less the feature maps; other shapes are not merged."""
    gc = _benchmark_module("gpu_check")
    bench = gc.bench
    shapes = bench.DEFAULTS["gpu"]["shapes"]
    ours = [dict(impl="linear pallas", T=T, mode="fwd", median_s=1e-3, min_s=1e-3, compile_s=1.0, mem_bytes=2**20,
                 runs=3, tokens_per_s=T / 1e-3, tflops=10.0) for T in (1024, 2048)]
    result = dict(config=dict(device="gpu", jax="x", backend="gpu", device_kind="H100", cpu_count=16, load_avg_end=None,
                              reps=10, **vars(shapes)), notes=[], peak_tflops=700.0, rows=ours)
    bench.write(result, str(tmp_path / "attention_gpu"))
    fla = dict(config=dict(device="gpu", device_kind="H100", versions={"torch": "2.11"}, batches=[1, 8],
                           lengths=[1024, 2048], H=32, K=8, D=128, F=64, W=64, dtype="bfloat16", reps=10,
                           unavailable=None, smoke=False),
               notes=[], peak_tflops=650.0, parity=[dict(impl="fla chunk_linear_attn", T=300, dtype="bfloat16",
                                                         rel_rms=3e-3, tol=2e-2, **{"pass": True})],
               rows=[dict(impl="fla chunk_linear_attn", B=B, T=T, mode="fwd", median_s=2e-3, min_s=2e-3, compile_s=30.0,
                          mem_bytes=2**21, runs=10, tokens_per_s=B * T / 2e-3) for B in (1, 8) for T in (1024, 2048)]
               + [dict(impl="fla linear+window W=64", B=1, T=2048, mode="fwd+bwd", skip="failed: RuntimeError: x")])
    for _ in range(2):
        line = gc.merge_fla_rows(str(tmp_path), fla)
    assert line.startswith("fla: 3 rows of B=1 merged")
    merged = json.loads((tmp_path / "attention_gpu.json").read_text())
    assert [(r["impl"], r["T"]) for r in merged["rows"]] == [
        ("linear pallas", 1024), ("fla chunk_linear_attn", 1024), ("linear pallas", 2048),
        ("fla chunk_linear_attn", 2048), ("fla linear+window W=64", 2048)]
    s1 = bench.Shapes(**{**vars(shapes), "B": 1})
    maps = 32 * 1024 * 4.0 * 128 * 64
    assert math.isclose(merged["rows"][1]["tflops"], (bench.model_flops("linear", s1, 1024) - maps) / 2e-3 / 1e12)
    text = (tmp_path / "attention_gpu.md").read_text()
    assert "| fla chunk_linear_attn | 1024 | fwd | 2.00 |" in text and "skipped: failed: RuntimeError" in text
    md = gc.fla_markdown(fla, line)
    assert "## B=8" in md and "| fla chunk_linear_attn | 2048 | fwd | 2.00 |" in md and "rel RMS 3.0e-03" in md
    other = json.loads(json.dumps(fla))
    other["config"]["H"] = 16
    assert "not merged" in gc.merge_fla_rows(str(tmp_path), other)


def test_batch_search_stops_between_a_batch_that_ran_and_one_out_of_memory():
    """The decode batch search (entered at max_batch where the device reports no memory, as on the CPU) halves after
    each out-of-memory until a batch runs, and records every cell; another error ends it as failed."""
    mc = _benchmark_module("gpu_model_check")

    class Gen:
        name, kinds = "teacher", "2 softmax layers"
        plan = types.SimpleNamespace(decode_tokens=4, max_batch=64)
        gen = types.SimpleNamespace(state={})

        def __init__(self, fits: int, error: str):
            self.fits, self.error = fits, error

        def prefill(self, T):
            figures = dict(prefill_s=1.0, prefill_tok_s=T, prefill_compile_s=0.0, prefill_peak_bytes=1)
            return figures, ("logits", "cache")

        def decode(self, prompt, T, B):
            if B > self.fits:
                raise RuntimeError(self.error)
            return dict(status="ran", decode_ms_per_step=1.0, decode_tok_s=B * 1e3, step_compile_s=0.0,
                        cache_bytes=B * 100, decode_peak_bytes=B * 100, device_peak_bytes=None)

    class Report:
        def __init__(self):
            self.result = dict(generate=[], search=[])

        def add(self, table, row):
            self.result[table].append(row)

        def save(self):
            pass

    oom = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes."
    report = Report()
    mc.generation_unit(Gen(8, oom), 1024, report, time.monotonic() + 60)
    assert [(r["B"], r["status"]) for r in report.result["generate"]] == [(1, "ran"), (64, "oom"), (32, "oom"),
                                                                           (16, "oom"), (8, "ran")]
    assert report.result["search"][0] == dict(model="teacher", T=1024, largest_B=8, decode_tok_s=8e3,
                                                   cache_bytes=800, stopped="out of memory at B=16")
    report = Report()
    mc.generation_unit(Gen(8, "INTERNAL: a kernel crashed"), 1024, report, time.monotonic() + 60)
    assert [(r["B"], r["status"]) for r in report.result["generate"]] == [(1, "ran"), (64, "failed")]
    assert report.result["search"][0]["stopped"] == "failed at B=64"


def test_stage_budgets_absorb_an_overrun_in_the_next_stage():
    gc = _benchmark_module("gpu_check")
    planned = dict(correctness=110, tuning=30, moe=25, bench=140, fla=75, model=160)
    todo = list(planned)
    now = time.monotonic()
    assert gc.planned_seconds("correctness", planned, todo, now + 550) == pytest.approx(110, abs=1)
    # 100 s later than planned when the bench starts: it loses them, fla and model keep theirs
    assert gc.planned_seconds("bench", planned, todo, now + 550 - 165 - 100) == pytest.approx(50, abs=1)
    assert gc.planned_seconds("fla", planned, todo, now + 235) == pytest.approx(75, abs=1)
    assert gc.planned_seconds("model", planned, todo, now + 20) == pytest.approx(20, abs=1)
    assert gc.planned_seconds("model", planned, todo, now - 5) == 0.0


def _env():
    import os

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env
