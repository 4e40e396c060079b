"""Generation benchmark: prefill and decode throughput and memory versus context length, for a linearized model
and its softmax teacher, in one run.

Per (model, context length T): a batch of B prompts of T tokens (fixed random ids) is prefilled in parallel, then N
tokens are decoded one jitted step at a time (greedy, on device). Reported:
  - prefill tokens/s = B·T / median prefill time; decode tokens/s = B·N / time of N steps (ms per step beside it);
  - cache MiB: the bytes of the per-layer decode caches after prefill (KV cache of T + N slots for softmax layers,
    the constant-size recurrent state for LoLCATS layers);
  - prefill / decode peak MiB: XLA's memory analysis of the compiled call (arguments + outputs + temporaries −
    donated aliases; the arguments include the weights);
  - on GPU, the device's peak bytes in use so far (a process high-water mark, so it only grows down the table).
Compilation is excluded from the timings and reported separately. Cells whose (T, T) attention maps would not fit
(the teacher's parallel prefill materialises them) are skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lolcats_jax.inference.generation import Generator
from lolcats_jax.model import decode
from lolcats_jax.bench.attention import device_memory_bytes
from lolcats_jax.bench.output import write_table
from lolcats_jax.model.llama import Llama

DEFAULTS = {
    "cpu": dict(lengths=[256, 1024, 4096], batch=1, decode_tokens=32, reps=3),
    "gpu": dict(lengths=[1024, 2048, 4096, 8192, 16384, 32768], batch=1, decode_tokens=128, reps=5),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...]
    batch: int
    decode_tokens: int
    reps: int
    seed: int = 0


def compiled_peak_bytes(compiled) -> int | None:
    """arguments + outputs + temporaries − aliased (donated) bytes of a compiled call, or None if XLA cannot say."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def attention_map_bytes(model: Llama, B: int, T: int) -> int:
    """fp32 bytes of one layer's (B, H, T, T) score + probability maps when any layer is softmax, else 0."""
    if "softmax" not in model.kinds:
        return 0
    return 2 * 4 * B * model.cfg.num_heads * T * T


def _median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_models(model: str, teacher: str | None, dtype: str, linearize: bool) -> list[tuple[str, Llama]]:
    """[("linearized", …), ("teacher", …)]: `model` is a run directory (its trained linearized model; the teacher
    defaults to the run's base model) or, with `linearize`, an HF directory linearized with the default attention
    options and fresh feature maps (speed and memory do not depend on the trained values)."""
    from lolcats_jax.config import Config, ModelConfig
    from lolcats_jax.inference.loading import load_hf_model, resolve_model_dir
    from lolcats_jax.model.build import model_options
    from lolcats_jax.model.llama_config import LlamaConfig

    kind, path = resolve_model_dir(model)
    if kind == "run":
        from lolcats_jax.config import load_config
        from lolcats_jax.inference.run_model import load_run_model

        lin = load_run_model(path, dtype=dtype)[0]
        teacher = teacher or load_config(path / "config.yaml").model.path
    elif linearize:
        cfg = Config(model=ModelConfig(path=str(path), param_dtype=dtype, compute_dtype=dtype, remat=False))
        opts = model_options(cfg, LlamaConfig.from_hf_dir(path).num_layers, linearize=True)
        lin = load_hf_model(path, dtype=dtype, opts=opts)
        teacher = teacher or str(path)
    else:
        from lolcats_jax.errors import UserError

        raise UserError(f"{model}: an HF directory holds a softmax model; pass --linearize to benchmark it with "
                         "fresh LoLCATS attention, or give a run directory")
    return [("linearized", lin), ("teacher", load_hf_model(teacher, dtype=dtype))]


def bench_cell(gen: Generator, B: int, T: int, N: int, reps: int, seed: int) -> dict:
    """One (model, T) cell: compile, time prefill (median of `reps`) and N decode steps, read the memory figures."""
    rng = np.random.default_rng(seed + T)
    tokens = jnp.asarray(rng.integers(0, 1000, size=(B, T), dtype=np.int32))
    lengths = jnp.full((B,), T, jnp.int32)
    max_len = T + N + 1

    t0 = time.perf_counter()
    prefill = gen._prefill.lower(gen.state, tokens, lengths, max_len=max_len).compile()
    logits, cache = jax.block_until_ready(prefill(gen.state, tokens, lengths))
    step = gen._step.lower(gen.state, cache, jnp.argmax(logits, -1).astype(jnp.int32)).compile()
    compile_s = time.perf_counter() - t0
    cache_bytes = decode.cache_bytes(cache)

    prefill_s = _median_time(lambda: prefill(gen.state, tokens, lengths), reps)

    logits, cache = prefill(gen.state, tokens, lengths)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    logits, cache = step(gen.state, cache, nxt)  # warm-up step
    jax.block_until_ready(logits)
    t0 = time.perf_counter()
    for _ in range(N):
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        logits, cache = step(gen.state, cache, nxt)
    jax.block_until_ready(logits)
    decode_s = time.perf_counter() - t0
    if decode.cache_bytes(cache) != cache_bytes:
        raise AssertionError(f"cache changed size during decoding: {cache_bytes} → {decode.cache_bytes(cache)} bytes")
    return dict(
        prefill_s=prefill_s, prefill_tok_s=B * T / prefill_s, decode_ms_per_step=1e3 * decode_s / N,
        decode_tok_s=B * N / decode_s, compile_s=compile_s, cache_bytes=cache_bytes,
        prefill_peak_bytes=compiled_peak_bytes(prefill), decode_peak_bytes=compiled_peak_bytes(step),
        device_peak_bytes=device_peak_bytes(),
    )


def run(models: list[tuple[str, Llama]], s: Settings, log=print, max_seconds: float | None = None) -> dict:
    """Every (model, T) cell, lengths in increasing order; returns {"config", "notes", "rows"}."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    limit = 0.4 * device_memory_bytes()
    rows, notes = [], []
    for name, model in models:
        gen = Generator(model)
        for T in s.lengths:
            cell = dict(model=name, kinds=_kinds(model), T=T, B=s.batch, N=s.decode_tokens)
            need = attention_map_bytes(model, s.batch, T)
            if T + s.decode_tokens + 1 > model.cfg.max_position_embeddings:
                notes.append(f"{name} T={T}: beyond the model's trained context ({model.cfg.max_position_embeddings}); "
                             "speed and memory are still meaningful, quality is not")
            if deadline is not None and time.monotonic() > deadline:
                cell["skip"] = f"not run: the {max_seconds:.0f} s time limit was reached"
            elif need > limit:
                cell["skip"] = f"parallel prefill needs ~{need / 2**30:.0f} GiB of (T, T) maps (limit {limit / 2**30:.0f} GiB)"
            else:
                try:
                    cell.update(bench_cell(gen, s.batch, T, s.decode_tokens, s.reps, s.seed))
                except Exception as err:  # noqa: BLE001 - a failing cell is reported, the grid continues
                    cell["skip"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(cell)
            log(_cell_line(cell))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    config = dict(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
                  cpu_count=os.cpu_count(), load_avg_end=load, **dataclasses.asdict(s))
    return dict(config=config, notes=notes, rows=rows)


def _kinds(model: Llama) -> str:
    n = len(model.kinds)
    lin = sum(k == "lolcats" for k in model.kinds)
    return f"{lin}/{n} LoLCATS layers" if lin else f"{n} softmax layers"


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def _cell_line(c: dict) -> str:
    head = f"{c['model']:>12} T={c['T']:>6}"
    if "skip" in c:
        return f"{head}: skipped ({c['skip']})"
    return (f"{head}: prefill {c['prefill_tok_s']:9.0f} tok/s, decode {c['decode_tok_s']:7.1f} tok/s "
            f"({c['decode_ms_per_step']:.1f} ms/step), cache {_mib(c['cache_bytes'])} MiB, compile {c['compile_s']:.1f} s")


def to_markdown(result: dict, title: str = "Generation benchmark") -> str:
    cfg = result["config"]
    lines = [f"# {title} ({cfg['backend']}: {cfg['device_kind']}, jax {cfg['jax']})", "",
             f"Batch {cfg['batch']}, {cfg['decode_tokens']} decoded tokens per cell after one warm-up step; prefill "
             f"time is the median of {cfg['reps']} runs; compilation excluded. Peak MiB = XLA memory analysis of the "
             "compiled call (arguments incl. weights + outputs + temporaries − donated buffers)."
             + (f" Host: {cfg['cpu_count']} CPUs, load average at the end {cfg['load_avg_end'][0]:.1f}."
                if cfg.get("load_avg_end") else ""), ""]
    gpu = any(r.get("device_peak_bytes") is not None for r in result["rows"])
    head = "| model | layers | context T | prefill tok/s | decode tok/s | ms/token | cache MiB | prefill peak MiB | decode peak MiB |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    if gpu:
        head, sep = head + " device peak MiB |", sep + "---:|"
    lines += [head, sep]
    for r in result["rows"]:
        if "skip" in r:
            lines.append(f"| {r['model']} | {r['kinds']} | {r['T']} | skipped: {r['skip']} |")
            continue
        row = (f"| {r['model']} | {r['kinds']} | {r['T']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
               f"{r['decode_ms_per_step']:.1f} | {_mib(r['cache_bytes'])} | {_mib(r['prefill_peak_bytes'])} | "
               f"{_mib(r['decode_peak_bytes'])} |")
        if gpu:
            row += f" {_mib(r.get('device_peak_bytes'))} |"
        lines.append(row)
    lines += ["", *growth_summary(result)]
    if result["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in dict.fromkeys(result["notes"])]]
    return "\n".join(lines) + "\n"


def growth_summary(result: dict) -> list[str]:
    """How cache size and decode speed change from the shortest to the longest measured context, per model."""
    out = []
    by_model: dict[str, list[dict]] = {}
    for r in result["rows"]:
        if "skip" not in r:
            by_model.setdefault(r["model"], []).append(r)
    for name, rs in by_model.items():
        if len(rs) < 2:
            continue
        lo, hi = min(rs, key=lambda r: r["T"]), max(rs, key=lambda r: r["T"])
        out.append(f"- {name}: T {lo['T']} → {hi['T']}: cache {_mib(lo['cache_bytes'])} → {_mib(hi['cache_bytes'])} MiB "
                   f"({hi['cache_bytes'] / lo['cache_bytes']:.2f}×), decode {lo['decode_tok_s']:.1f} → "
                   f"{hi['decode_tok_s']:.1f} tok/s")
    return out


def write(result: dict, out: str, title: str = "Generation benchmark") -> None:
    """Markdown to `out` (a .md path, or any stem) and JSON beside it."""
    write_table(result, to_markdown(result, title), out)
