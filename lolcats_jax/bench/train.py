"""Training-step benchmark: tokens/s and compiled memory of the recipe's real distill and finetune steps.

Per (stage, T): the stage's train step exactly as the recipe builds it (same model options, trainable split, loss,
optimizer, mesh and jit shardings, weights read from the config's HF directory or `--model`), on a batch of
(A, B, T) fixed random token ids. Compilation is timed separately; then the step runs `reps` times after one warm
run, each timed to completion (`block_until_ready`). Reported: step seconds (median, min), tokens/s = A·B·T / median,
and XLA's memory analysis of the compiled step (arguments + outputs + temporaries − donated aliases, per device).
The machine's load average is recorded before and after (timings on a loaded machine mean little).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lolcats_jax.bench.output import write_table
from lolcats_jax.config import Config

STAGES = ("distill", "finetune")
DEFAULTS = {"cpu": dict(lengths=[256, 1024], reps=3), "gpu": dict(lengths=[1024, 2048, 4096], reps=5)}


@dataclasses.dataclass(frozen=True)
class Cell:
    stage: str
    T: int
    B: int
    A: int


def _stage_parts(cfg: Config, stage: str):
    """(model options lora, trainable filter, loss fn, optimizer config) of `stage` as the recipe builds them."""
    from flax import nnx

    from lolcats_jax.model.llama import FeatureMapParam, LoraParam, WindowParam
    from lolcats_jax.train.losses import distill_loss, finetune_loss_fn

    if stage == "distill":
        d = cfg.distill
        loss = functools.partial(distill_loss, mse_factor=d.mse_factor, xent_factor=d.xent_factor)
        return None, nnx.Any(FeatureMapParam, WindowParam), loss, d.optim
    f = cfg.finetune
    filt = nnx.Any(LoraParam, FeatureMapParam, WindowParam) if f.lora.train_attention else LoraParam
    return f.lora, filt, finetune_loss_fn(f), f.optim


def build_cell(cfg: Config, model_dir: str, mesh, cell: Cell, base_cache: dict):
    """A ready-to-call (train_step, args) of `cell` and the compile seconds and compiled memory."""
    from convert.hf_to_flax import load_hf_params, read_config
    from lolcats_jax.model.build import model_options

    lc = read_config(model_dir)
    lora = _stage_parts(cfg, cell.stage)[0]
    linearize = cfg.attention.kind == "lolcats"
    opts = model_options(cfg, lc.num_layers, lora=lora, linearize=linearize)
    model = load_hf_params(model_dir, mesh, param_dtype=cfg.model.param_dtype, opts=opts, seed=cfg.run.seed,
                           base_cache=base_cache)
    return compile_step(cfg, model, mesh, cell, lc.vocab_size)


def stage_lora(cfg: Config, stage: str):
    """The LoRA settings the model of `stage` is built with (None for distill)."""
    return _stage_parts(cfg, stage)[0]


def compile_step(cfg: Config, model, mesh, cell: Cell, vocab_size: int, *, copy_trainables: bool = False):
    """(step, compile seconds, compiled memory) of the recipe's `cell.stage` train step on `model` (built with
    `stage_lora(cfg, cell.stage)`) for (A, B, T) random token ids; `step()` runs it once and returns its metrics.
    copy_trainables: the step donates its trainables, so copy them first when other models share these arrays."""
    from lolcats_jax import compat
    from lolcats_jax.bench.generate import compiled_peak_bytes
    from lolcats_jax.train.optim import make_optimizer
    from lolcats_jax.train.step import batch_sharding, build_steps, split_model

    _, filt, loss_fn, optim = _stage_parts(cfg, cell.stage)
    split = split_model(model, filt)
    if copy_trainables:
        split.trainable = {k: jnp.copy(v) for k, v in split.trainable.items()}
    init_opt, train, _, _ = build_steps(split, make_optimizer(optim), loss_fn, mesh)
    ids = np.random.default_rng(0).integers(0, vocab_size, (cell.A, cell.B, cell.T), dtype=np.int32)
    sharding = batch_sharding(mesh, True, cell.B)
    batch = {"input_ids": jax.device_put(ids, sharding), "labels": jax.device_put(ids, sharding)}
    lr = jnp.float32(optim.lr)
    key = jax.random.PRNGKey(0)
    with compat.set_mesh(mesh):
        opt_state = init_opt(split.trainable)
        t0 = time.perf_counter()
        compiled = train.lower(split.trainable, opt_state, split.frozen, batch, lr, key).compile()
        compile_s = time.perf_counter() - t0
    state = {"trainable": split.trainable, "opt": opt_state}

    def step():
        with compat.set_mesh(mesh):
            t, o, m = compiled(state["trainable"], state["opt"], split.frozen, batch, lr, key)
        jax.block_until_ready((t, o, m))
        state["trainable"], state["opt"] = t, o  # donated: the next call takes the new ones
        return m

    return step, compile_s, compiled_peak_bytes(compiled)


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run(cfg: Config, model_dir: str, cells: list[Cell], reps: int, *, max_seconds: float | None = None) -> dict:
    from lolcats_jax.sharding import make_mesh

    mesh = make_mesh(cfg.mesh.shape())
    base_cache: dict = {}
    rows = []
    t_start = time.perf_counter()
    load_before = _load()
    for cell in cells:
        if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
            rows.append(dict(dataclasses.asdict(cell), skipped="time budget spent"))
            continue
        step, compile_s, peak = build_cell(cfg, model_dir, mesh, cell, base_cache)
        m = step()  # warm: first run of the executable
        loss = float(m["loss"])
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        tokens = cell.A * cell.B * cell.T
        rows.append(dict(dataclasses.asdict(cell), tokens=tokens, compile_s=round(compile_s, 2),
                         step_s_median=round(med, 4), step_s_min=round(min(times), 4), tokens_per_s=round(tokens / med, 1),
                         peak_mib=None if peak is None else round(peak / 2**20, 1), first_loss=loss))
        print(_row_md(rows[-1]), flush=True)
    return {
        "config": dict(model=str(model_dir), attention=cfg.attention.kind, window_size=cfg.attention.window_size,
                       feature_dim=cfg.attention.feature_dim, param_dtype=cfg.model.param_dtype,
                       compute_dtype=cfg.model.compute_dtype, remat=cfg.model.remat, mesh=dict(mesh.shape),
                       xent_factor=cfg.distill.xent_factor, lora_targets=list(cfg.finetune.lora.targets),
                       lora_rank=cfg.finetune.lora.rank, reps=reps,
                       finetune_loss={"xent_factor": cfg.finetune.xent_factor, "kl_factor": cfg.finetune.kl_factor}),
        "machine": dict(backend=jax.default_backend(), devices=len(jax.devices()), cpus=os.cpu_count(),
                        jax=jax.__version__, python=platform.python_version(),
                        load_before=load_before, load_after=_load(),
                        xla_flags=os.environ.get("XLA_FLAGS", ""), glibc_tunables=os.environ.get("GLIBC_TUNABLES", "")),
        "rows": rows,
    }


HEADER = ("| stage | T | B | A | tokens/step | compile s | step s (median) | step s (min) | tokens/s | compiled peak MiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _row_md(r: dict) -> str:
    if "skipped" in r:
        return f"| {r['stage']} | {r['T']} | {r['B']} | {r['A']} | — | — | — | — | not run: {r['skipped']} | — |"
    return (f"| {r['stage']} | {r['T']} | {r['B']} | {r['A']} | {r['tokens']} | {r['compile_s']} | {r['step_s_median']} | "
            f"{r['step_s_min']} | {r['tokens_per_s']} | {r['peak_mib']} |")


def to_markdown(result: dict) -> str:
    c, m = result["config"], result["machine"]
    head = (f"Train steps of `{c['model']}` ({c['attention']} attention, window {c['window_size']}, feature dim "
            f"{c['feature_dim']}, params {c['param_dtype']} / compute {c['compute_dtype']}, remat {c['remat']}, "
            f"distill xent_factor {c['xent_factor']}, LoRA r={c['lora_rank']} on {','.join(c['lora_targets'])}"
            + "".join(f", finetune {k} {v}" for k, v in c.get("finetune_loss", {}).items()) + ") on "
            f"{m['devices']} {m['backend']} device(s), {m['cpus']} CPUs, jax {m['jax']}; mesh {c['mesh']}; median of "
            f"{c['reps']} timed steps after one warm step. Load average (1, 5, 15 min) before {m['load_before']}, "
            f"after {m['load_after']}. GLIBC_TUNABLES={m.get('glibc_tunables') or '(unset)'}.")
    return "\n".join([head, "", HEADER, *(_row_md(r) for r in result["rows"])]) + "\n"


def write(result: dict, out: str) -> None:
    write_table(result, to_markdown(result), out)
