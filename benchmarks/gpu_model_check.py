"""The 8B-shaped model stage of the GPU check: train-step and generation throughput of a Llama-3.1-8B-shaped model.

benchmarks/gpu_check.py runs this file as a subprocess (a hard time limit, and a process whose device peak is its
own); standalone: python benchmarks/gpu_model_check.py --out DIR [--seconds S] [--smoke].

Model: Llama-3.1-8B's architecture (LLAMA31_8B: hidden 4096, 32 layers, 32 query / 8 kv heads of dim 128, MLP
14336, vocab 128256, llama3 RoPE scaling, untied head), random weights created on the device in their shards
(`lolcats_jax.model.build.init_sharded`, one-device mesh), dtypes, remat and attention settings of
configs/llama3_1_8b.yaml (LoLCATS hybrid, backend AUTO: the Pallas kernels on a GPU). One set of base weights
serves three models — with LoRA adapters (finetune), without (distill, generation) and all-softmax (the teacher);
their arrays are shared, not copied.

Measured (each cell guarded: an out-of-memory is recorded for that cell and the stage continues):
  train     the recipe's distill and finetune steps at T (the stage's batch × gradient accumulation), built as
            `python -m lolcats_jax.bench train` builds them (same trainable split, loss, optimizer, jit shardings
            and donation): compile seconds; step seconds (median and min of `reps` after a warm step, each run to
            completion); tokens/s = A·B·T / median; XLA's memory analysis of the compiled step (arguments + outputs
            + temporaries − donated, per device) and the device's peak bytes in use so far (`memory_stats()`,
            a high-water mark of this process: it only grows down the table).
  generate  per model (linearized, teacher) and context T: the prefill of one T-token prompt (median of `reps`
            calls, tokens/s = T / median), then decoding: N greedy steps timed together after one warm step, at
            batch B = 1 and then at the largest power of two B ≤ max_batch that fits, with decode tokens/s = B·N /
            time, ms per step, cache MiB (KV cache of T + N + 1 slots per softmax layer; the constant-size state of
            a LoLCATS layer) and the compiled step's memory. The B-row decode cache is the prompt's cache repeated
            over B rows (decode speed and memory do not depend on the rows' contents): a long prompt is prefilled
            once, not B times. The prefill stays at one prompt: at T ≥ 1K one prompt's GEMMs already fill a GPU
            (compute-bound), while decoding is memory-bound — its speed and capacity grow with B, and that is where
            the linearized model's constant-size state shows against the teacher's KV cache.
            Batch search: the doubling sequence 1, 2, 4, …, max_batch, entered at the largest power of two that
            the device's free memory suggests (free bytes after B=1 / (cache + step temporaries per row), with
            a 25 % margin; max_batch where the device reports no memory); then up by doubling while it runs, down
            by halving after an out-of-memory, until neighbours B (ran) and 2B (out of memory) are found, B reaches
            max_batch, or the time limit. The summary table gives each (model, T)'s largest B and what stopped it.
The stage fails (exit 1) if a cell failed for another reason than running out of memory; cells left for the time
limit are listed as not run. model_gpu.md / model_gpu.json are rewritten (whole, then renamed) after every cell.
--smoke runs the same code on a tiny architecture (SMOKE_ARCH) on the CPU.
Notation: A accumulation steps, B batch, T tokens, N decoded tokens, L layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lolcats_jax.bench.generate import compiled_peak_bytes, device_peak_bytes  # noqa: E402
from lolcats_jax.bench.output import write_table  # noqa: E402
from lolcats_jax.model.llama_config import LlamaConfig, RopeScaling  # noqa: E402

LLAMA31_8B = LlamaConfig(  # configs/architectures/llama3_1_8b.json, written out
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=False, max_position_embeddings=131072,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_id=128001)
SMOKE_ARCH = dataclasses.replace(LLAMA31_8B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
                                 num_heads=4, num_kv_heads=2, head_dim=16)
RECIPE = os.path.join(ROOT, "configs", "llama3_1_8b.yaml")


@dataclasses.dataclass(frozen=True)
class Plan:
    arch: LlamaConfig
    overrides: tuple[str, ...]  # on the recipe config (the smoke's narrower attention)
    train_T: int
    lengths: tuple[int, ...]  # generation contexts, most wanted first (a time limit cuts the rest)
    max_batch: int
    decode_tokens: int
    reps: int


PLANS = {
    "gpu": Plan(LLAMA31_8B, (), train_T=1024, lengths=(32768, 1024, 16384, 4096), max_batch=256, decode_tokens=16,
                reps=3),
    "smoke": Plan(SMOKE_ARCH, ("attention.window_size=16", "attention.chunk_size=16", "attention.feature_dim=16"),
                  train_T=64, lengths=(64, 128), max_batch=4, decode_tokens=4, reps=2),
}
GEN_MODELS = ("linearized", "teacher")


def is_oom(err: BaseException) -> bool:
    """Whether `err` is the device running out of memory (XLA's RESOURCE_EXHAUSTED)."""
    text = f"{type(err).__name__}: {err}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _error_cell(err: BaseException) -> dict:
    status = "oom" if is_oom(err) else "failed"
    if status == "failed":
        traceback.print_exc()
    return dict(status=status, skip=f"{'out of memory' if status == 'oom' else 'failed'}: {type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:200] if str(err) else ''}")


def with_options(model, arch: LlamaConfig, opts, seed: int):
    """`model`'s parameters under other model options (a subset of its parameters: arrays shared, not copied)."""
    from flax import nnx

    from lolcats_jax.model.build import abstract_model

    graphdef, abstract = nnx.split(abstract_model(arch, opts, seed))
    have = dict(nnx.to_flat_state(nnx.state(model)))
    flat = nnx.to_flat_state(abstract)
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(have[p].get_value())) for p, v in flat]))


class Report:
    """The stage's result, rewritten to model_gpu.md / .json after every cell."""

    def __init__(self, out_dir: str, config: dict):
        self.out = os.path.join(out_dir, "model_gpu")
        self.result = dict(config=config, notes=[], train=[], generate=[], search=[])

    def add(self, table: str, row: dict) -> None:
        self.result[table].append(row)
        print(f"== model {table}: {row}", flush=True)
        self.save()

    def save(self) -> None:
        write_table(self.result, to_markdown(self.result), self.out)


def _median_time(fn, reps: int) -> tuple[float, float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def train_cell(cfg, model, mesh, stage: str, T: int, reps: int, vocab: int) -> dict:
    """The recipe's `stage` train step on `model` at T (its batch × accumulation), compiled and timed."""
    from lolcats_jax.bench.train import Cell, compile_step

    sec = cfg.distill if stage == "distill" else cfg.finetune
    B, A = sec.batch_size, sec.optim.grad_accum
    step, compile_s, peak = compile_step(cfg, model, mesh, Cell(stage, T, B, A), vocab, copy_trainables=True)
    first_loss = float(step()["loss"])
    median_s, min_s = _median_time(step, reps)
    return dict(status="ran", tokens=A * B * T, compile_s=compile_s, step_s_median=median_s, step_s_min=min_s,
                tokens_per_s=A * B * T / median_s, compiled_peak_bytes=peak, device_peak_bytes=device_peak_bytes(),
                first_loss=first_loss)


class Generation:
    """Prefill and decode cells of one model (`Generator`'s jitted prefill and step, compiled per shape here so
    that compile time and compiled memory are read per call; the linearized model's step, whose cache does not
    depend on T, compiles once per B)."""

    def __init__(self, name: str, model, plan: Plan):
        from lolcats_jax.inference.generation import Generator

        self.name, self.plan, self.gen = name, plan, Generator(model)
        self.kinds = (f"{sum(k == 'lolcats' for k in model.kinds)}/{len(model.kinds)} LoLCATS layers"
                      if "lolcats" in model.kinds else f"{len(model.kinds)} softmax layers")
        self.steps: dict = {}  # (leaf shapes and dtypes of the cache) -> (compiled step, compile seconds)

    def prefill(self, T: int) -> tuple[dict, tuple]:
        """One prompt of T tokens: compile, warm call, median of `reps` calls; returns (figures, (logits, cache))."""
        g, N = self.gen, self.plan.decode_tokens
        tokens = jnp.asarray(np.random.default_rng(T).integers(0, self.plan.arch.vocab_size, (1, T), dtype=np.int32))
        lengths = jnp.full((1,), T, jnp.int32)
        t0 = time.perf_counter()
        compiled = g._prefill.lower(g.state, tokens, lengths, max_len=T + N + 1).compile()
        compile_s = time.perf_counter() - t0
        out = jax.block_until_ready(compiled(g.state, tokens, lengths))
        median_s, _ = _median_time(lambda: compiled(g.state, tokens, lengths), self.plan.reps)
        return dict(prefill_s=median_s, prefill_tok_s=T / median_s, prefill_compile_s=compile_s,
                    prefill_peak_bytes=compiled_peak_bytes(compiled)), out

    def decode(self, prompt: tuple, T: int, B: int) -> dict:
        """N decode steps at batch B from `prompt` (one row's logits and cache) repeated over B rows."""
        from lolcats_jax.model import decode

        g, N = self.gen, self.plan.decode_tokens
        row_logits, row_cache = prompt
        sds = jax.ShapeDtypeStruct
        target = jax.eval_shape(lambda s, t, n: g._prefill(s, t, n, max_len=T + N + 1), g.state,
                                sds((B, T), jnp.int32), sds((B,), jnp.int32))
        logits, cache = jax.tree.map(lambda x, s: jnp.copy(x) if x.shape == s.shape else jnp.broadcast_to(x, s.shape),
                                     (row_logits, row_cache), target)  # new buffers: the step donates its cache
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        key = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(cache))
        compiled_here = key not in self.steps
        if compiled_here:
            t0 = time.perf_counter()
            self.steps[key] = (g._step.lower(g.state, cache, nxt).compile(), time.perf_counter() - t0)
        step, compile_s = self.steps[key]
        cache_bytes = decode.cache_bytes(cache)
        logits, cache = step(g.state, cache, nxt)  # warm-up step
        jax.block_until_ready(logits)
        t0 = time.perf_counter()
        for _ in range(N):
            logits, cache = step(g.state, cache, jnp.argmax(logits, -1).astype(jnp.int32))
        jax.block_until_ready(logits)
        decode_s = time.perf_counter() - t0
        return dict(status="ran", decode_ms_per_step=1e3 * decode_s / N, decode_tok_s=B * N / decode_s,
                    step_compile_s=compile_s if compiled_here else None, cache_bytes=cache_bytes,
                    decode_peak_bytes=compiled_peak_bytes(step),
                    device_peak_bytes=device_peak_bytes())


def first_guess(row: dict, max_batch: int) -> int:
    """Where the batch search enters the doubling sequence: the largest power of two ≤ max_batch whose rows fit
    the memory the device has free now, a row costing its cache or, if larger, the B=1 step's compiled memory
    beyond the weights (25 % margin); at least 2; max_batch when the device reports no memory figures."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if not stats or not stats.get("bytes_limit"):
        return max_batch
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    per_row = 1.25 * max(row["cache_bytes"], (row["decode_peak_bytes"] or 0) - row["weights_bytes"], 1)
    fits = max(2, int(free // per_row))
    return min(max_batch, 1 << (fits.bit_length() - 1))


def generation_unit(gen: Generation, T: int, report: Report, deadline: float) -> None:
    """Prefill of one T-token prompt, decoding at B = 1, then the batch search (see the module docstring); every
    cell is a row of the report, and the (model, T) summary one row of its `search` table."""
    base = dict(model=gen.name, kinds=gen.kinds, T=T, N=gen.plan.decode_tokens)
    summary = dict(model=gen.name, T=T, largest_B=None, stopped="not run: the model stage's time limit")
    report.result["search"].append(summary)
    if time.monotonic() > deadline:
        report.add("generate", dict(base, B=1, status="not_run", skip="not run: the model stage's time limit"))
        return
    try:
        figures, prompt = gen.prefill(T)
        row = dict(base, B=1, **figures, **gen.decode(prompt, T, 1))
    except Exception as err:  # noqa: BLE001 - recorded; the next unit runs
        row = dict(base, B=1, **_error_cell(err))
        summary["stopped"] = row["skip"]
        report.add("generate", row)
        return
    row["weights_bytes"] = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(gen.gen.state))
    summary.update(largest_B=1, decode_tok_s=row["decode_tok_s"], cache_bytes=row["cache_bytes"],
                   stopped="(the run ended during this search)")
    report.add("generate", row)
    max_batch = gen.plan.max_batch
    lo, hi, B = 1, None, first_guess(row, max_batch)  # lo: largest B that ran; hi: smallest out of memory
    while True:
        if 2 * lo > max_batch:
            summary["stopped"] = f"max_batch={max_batch} reached"
            break
        if hi is not None and hi <= 2 * lo:
            summary["stopped"] = f"out of memory at B={hi}"
            break
        if time.monotonic() > deadline:
            summary["stopped"] = f"the time limit (next B={B})"
            break
        try:
            cell = dict(base, B=B, **gen.decode(prompt, T, B))
        except Exception as err:  # noqa: BLE001 - recorded; the search goes on below B
            cell = dict(base, B=B, **_error_cell(err))
        report.add("generate", cell)
        if cell["status"] == "failed":
            summary["stopped"] = f"failed at B={B}"
            break
        if cell["status"] == "ran":
            lo = B
            summary.update(largest_B=B, decode_tok_s=cell["decode_tok_s"], cache_bytes=cell["cache_bytes"])
        else:
            hi = B
        B = 2 * lo if hi is None else hi // 2
    report.save()


def _gpu_memory_line() -> str | None:
    """nvidia-smi's used / total memory of GPU 0 when this stage starts (other processes' share included)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def run(out_dir: str, seconds: float, plan: Plan, smoke: bool) -> bool:
    from flax import nnx

    from kernels.lolcats import Backend, resolve_backend
    from lolcats_jax import compat
    from lolcats_jax.bench.train import stage_lora
    from lolcats_jax.config import load_config
    from lolcats_jax.model.build import init_sharded, model_options
    from lolcats_jax.sharding import make_mesh

    deadline = time.monotonic() + seconds
    cfg = load_config(RECIPE, plan.overrides)
    arch, L = plan.arch, plan.arch.num_layers
    mesh = make_mesh(cfg.mesh.shape(), devices=jax.devices()[:1])
    opts = {"finetune": model_options(cfg, L, lora=stage_lora(cfg, "finetune")),
            "linearized": model_options(cfg, L), "teacher": model_options(cfg, L, linearize=False)}
    spec = opts["linearized"].lolcats.spec()
    backend = resolve_backend(Backend(cfg.attention.backend), spec,
                              ((1, plan.train_T, arch.num_heads, arch.head_dim),
                               (1, plan.train_T, arch.num_kv_heads, arch.head_dim), cfg.attention.feature_dim))
    dev = jax.devices()[0]
    report = Report(out_dir, dict(
        arch=dataclasses.asdict(arch), params=arch.num_params(), attention=dataclasses.asdict(cfg.attention),
        attention_backend=f"{cfg.attention.backend} -> {backend.value}", param_dtype=cfg.model.param_dtype,
        compute_dtype=cfg.model.compute_dtype, remat=cfg.model.remat,
        plan={f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name != "arch"},
        device_kind=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
        python=platform.python_version(), memory_stats_at_start=dev.memory_stats() if hasattr(dev, "memory_stats")
        else None, nvidia_smi_used_total=_gpu_memory_line(), seconds=seconds, smoke=smoke))
    ok = True
    with compat.set_mesh(mesh):
        t0 = time.perf_counter()
        full = init_sharded(arch, opts["finetune"], mesh, seed=cfg.run.seed)
        jax.block_until_ready(nnx.state(full))
        report.result["config"]["init_s"] = time.perf_counter() - t0
        models = {"finetune": full, "linearized": with_options(full, arch, opts["linearized"], cfg.run.seed),
                  "teacher": with_options(full, arch, opts["teacher"], cfg.run.seed)}
        for stage, model_name in (("distill", "linearized"), ("finetune", "finetune")):
            sec = cfg.distill if stage == "distill" else cfg.finetune
            row = dict(stage=stage, T=plan.train_T, B=sec.batch_size, A=sec.optim.grad_accum)
            if time.monotonic() > deadline:
                row.update(status="not_run", skip="not run: the model stage's time limit")
            else:
                try:
                    row.update(train_cell(cfg, models[model_name], mesh, stage, plan.train_T, plan.reps,
                                          arch.vocab_size))
                except Exception as err:  # noqa: BLE001 - recorded; the next cell runs
                    row.update(_error_cell(err))
            ok &= row["status"] != "failed"
            report.add("train", row)
        gens = {name: Generation(name, models[name], plan) for name in GEN_MODELS}
        for T in plan.lengths:
            for name in GEN_MODELS:
                generation_unit(gens[name], T, report, deadline)
    ok &= all(r["status"] != "failed" for r in report.result["generate"])
    report.save()
    return ok


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def to_markdown(result: dict) -> str:
    c = result["config"]
    a, att = c["arch"], c["attention"]
    title = "Tiny model (CPU smoke of the 8B-shaped stage)" if c["smoke"] else "Llama-3.1-8B-shaped model"
    lines = [f"# {title} ({c['backend']}: {c['device_kind']}, jax {c['jax']})", "",
             f"Architecture: {a['num_layers']} layers, hidden {a['hidden_size']}, {a['num_heads']} heads / "
             f"{a['num_kv_heads']} kv heads of dim {a['head_dim']}, MLP {a['intermediate_size']}, vocab "
             f"{a['vocab_size']}, {c['params'] / 1e9:.3g}B parameters, random weights, params {c['param_dtype']} / "
             f"compute {c['compute_dtype']}, remat {c['remat']}. Attention: {att['kind']} {att['form']} "
             f"{att['window']} window {att['window_size']}, {att['feature_map']} F={att['feature_dim']}, backend "
             f"{c['attention_backend']}. Model init {c.get('init_s', float('nan')):.1f} s. Device memory at the "
             f"start: nvidia-smi used / total {c['nvidia_smi_used_total'] or 'n/a'}. Compile excluded from every "
             "timing; figures per benchmarks/gpu_model_check.py's docstring.", "",
             "## Train steps", "",
             "| stage | T | B | A | tokens/step | compile s | step s (median) | step s (min) | tokens/s | "
             "compiled peak MiB | device peak MiB | first loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["train"]:
        head = f"| {r['stage']} | {r['T']} | {r['B']} | {r['A']} |"
        if r["status"] != "ran":
            lines.append(f"{head} {r['skip']} |")
            continue
        lines.append(f"{head} {r['tokens']} | {r['compile_s']:.1f} | {r['step_s_median']:.3f} | {r['step_s_min']:.3f} "
                     f"| {r['tokens_per_s']:.0f} | {_mib(r['compiled_peak_bytes'])} | {_mib(r['device_peak_bytes'])} "
                     f"| {r['first_loss']:.3g} |")
    lines += ["", "## Generation: prefill of one prompt, decoding at batch B", "",
              "| model | layers | T | B | prefill tok/s | prefill compile s | decode tok/s | ms/step | step compile s "
              "| cache MiB | decode peak MiB | device peak MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(result["generate"], key=lambda r: (GEN_MODELS.index(r["model"]), r["T"], r["B"])):
        head = f"| {r['model']} | {r['kinds']} | {r['T']} | {r['B']} |"
        if r["status"] != "ran":
            lines.append(f"{head} {r['skip']} |")
            continue
        prefill = (f"{r['prefill_tok_s']:.0f} | {r['prefill_compile_s']:.1f}" if "prefill_tok_s" in r
                   else "(B=1 row) | —")
        step_compile = "(reused)" if r["step_compile_s"] is None else f"{r['step_compile_s']:.1f}"
        lines.append(f"{head} {prefill} | {r['decode_tok_s']:.1f} | {r['decode_ms_per_step']:.2f} | "
                     f"{step_compile} | {_mib(r['cache_bytes'])} | {_mib(r['decode_peak_bytes'])} | "
                     f"{_mib(r['device_peak_bytes'])} |")
    lines += ["", "## Largest decode batch per context", "",
              "| model | T | largest B | decode tok/s at it | cache MiB at it | search stopped by |",
              "|---|---:|---:|---:|---:|---|"]
    for s in sorted(result["search"], key=lambda s: (GEN_MODELS.index(s["model"]), s["T"])):
        if s["largest_B"] is None:
            lines.append(f"| {s['model']} | {s['T']} | — | — | — | {s['stopped']} |")
            continue
        lines.append(f"| {s['model']} | {s['T']} | {s['largest_B']} | {s['decode_tok_s']:.1f} | "
                     f"{_mib(s['cache_bytes'])} | {s['stopped']} |")
    if result["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=160.0, help="start no cell after this many seconds")
    p.add_argument("--smoke", action="store_true", help="the tiny architecture (CPU smoke test of this script)")
    p.add_argument("--lengths", type=int, nargs="+", help="generation contexts (default: the plan's)")
    p.add_argument("--max-batch", dest="max_batch", type=int, help="largest decode batch tried (default: the plan's)")
    a = p.parse_args(argv)
    plan = PLANS["smoke" if a.smoke else "gpu"]
    plan = dataclasses.replace(plan, **{k: v for k, v in (("lengths", tuple(a.lengths or ())),
                                                          ("max_batch", a.max_batch)) if v})
    if not a.smoke and jax.default_backend() != "gpu":
        print(f"no GPU: JAX backend is {jax.default_backend()!r} (use --smoke for the tiny CPU run)", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    return 0 if run(a.out, a.seconds, plan, a.smoke) else 1


if __name__ == "__main__":
    sys.exit(main())
