"""The recipe's training stages: attention transfer (`distill`) and LoRA finetuning (`finetune`).

Each stage writes into `<run.dir>/<stage>/`: resumable checkpoints, the best parameters, `final/` (the stage's
trainable parameters, what later stages and inference load) and `done.json` (its summary; a finished stage is
skipped when the command is run again).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from lolcats_jax.config import Config
from lolcats_jax.errors import CheckpointError, UserError
from lolcats_jax.fsio import write_json_atomic
from lolcats_jax.model.build import model_options
from lolcats_jax.model.llama import FeatureMapParam, Llama, LoraParam, WindowParam
from lolcats_jax.model.llama_config import LlamaConfig
from lolcats_jax.train.ckpt import load_params, save_params
from lolcats_jax.train.loop import LoopConfig, train_loop
from lolcats_jax.train.losses import distill_loss, finetune_loss_fn
from lolcats_jax.train.step import path_key, split_model


@dataclasses.dataclass
class RunContext:
    cfg: Config
    run_dir: Path
    mesh: jax.sharding.Mesh
    llama_cfg: LlamaConfig
    tokenizer: Any
    process_index: int = 0
    process_count: int = 1

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name


# ------------------------------------------------------------------------------------------------ model I/O


def load_base(ctx: RunContext, *, linearize: bool, lora=None, base_cache: dict | None = None) -> Llama:
    """The pretrained model on the mesh, with linearized layers (fresh feature maps) and/or fresh LoRA; models
    loaded with the same `base_cache` share one read of the base weights."""
    from convert.hf_to_flax import load_hf_params

    opts = model_options(ctx.cfg, ctx.llama_cfg.num_layers, lora=lora, linearize=linearize)
    return load_hf_params(ctx.cfg.model.path, ctx.mesh, param_dtype=ctx.cfg.model.param_dtype, opts=opts,
                          seed=ctx.cfg.run.seed, base_cache=base_cache)


def assign_params(model: Llama, params: dict[str, jax.Array], *, where: str) -> None:
    """Overwrites the model parameters named by `params` ({"lolcats/fmap_q": array, ...})."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    by_key = {path_key(p): p for p in flat}
    unknown = sorted(set(params) - set(by_key))
    if unknown:
        raise CheckpointError(f"{where}: parameters {unknown} do not exist in this model")
    for key, value in params.items():
        var = flat[by_key[key]]
        if tuple(var.get_value().shape) != tuple(value.shape):
            raise CheckpointError(f"{where}: {key} has shape {tuple(value.shape)}, the model expects {tuple(var.get_value().shape)}")
    updates = [(by_key[k], flat[by_key[k]].replace(v)) for k, v in params.items()]
    nnx.update(model, nnx.from_flat_state(updates))


def load_stage_params(ctx: RunContext, model: Llama, stage: str, *, keys=None) -> dict:
    """Loads `<run_dir>/<stage>/final` into `model` (restricted to `keys` if given); returns the stage meta."""
    final = ctx.stage_dir(stage) / "final"
    if not final.exists():
        raise CheckpointError(f"{final}: missing — run the '{stage}' stage first")
    return load_params_into(model, final, keys=keys)


def load_params_into(model: Llama, path: Path, *, keys=None) -> dict:
    """Loads a `save_params` directory (a stage's `final/` or one of its `snapshots/<step>`) into `model`; returns
    its meta."""
    flat = {path_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    from lolcats_jax.train.ckpt import saved_keys

    wanted = saved_keys(path) if keys is None else keys
    missing = sorted(set(wanted) - set(flat))
    if missing:
        raise CheckpointError(f"{path}: holds {missing}, which this model does not have (were the stage configs changed?)")
    target = {k: flat[k] for k in wanted}
    params, meta = load_params(path, target)
    assign_params(model, params, where=str(path))
    return meta


def stage_done(ctx: RunContext, stage: str) -> dict | None:
    path = ctx.stage_dir(stage) / "done.json"
    return json.loads(path.read_text()) if path.exists() else None


def mark_done(ctx: RunContext, stage: str, summary: dict) -> None:
    if not ctx.is_main:
        return
    write_json_atomic(ctx.stage_dir(stage) / "done.json", summary)


def clear_done(ctx: RunContext, stage: str) -> None:
    """A stage that (re)starts withdraws its done marker first: whatever it rewrites (e.g. `final/`) is then never
    behind a marker that calls it finished."""
    if ctx.is_main:
        (ctx.stage_dir(stage) / "done.json").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- data


def _data(ctx: RunContext, section, batch_size: int, grad_accum: int, seed: int):
    from lolcats_jax.data.pipeline import build_datasets, make_eval_iterator, make_train_iterator

    if batch_size % ctx.process_count:
        raise UserError(f"batch_size={batch_size} must be a multiple of the {ctx.process_count} processes")
    local = batch_size // ctx.process_count
    train_ds, val_ds = build_datasets(
        section.data, ctx.tokenizer, max_context=ctx.llama_cfg.max_position_embeddings,
        process_index=ctx.process_index, process_count=ctx.process_count,
    )
    if val_ds is None:
        raise UserError("the stage needs validation data: set data.validation or data.val_size > 0")
    train_iter = make_train_iterator(
        train_ds, local * grad_accum, seed, process_index=ctx.process_index, process_count=ctx.process_count,
        num_epochs=section.epochs,
    )
    steps = section.max_steps
    if section.epochs is not None:
        steps = len(train_ds) * section.epochs // (batch_size * grad_accum)
    val_batches = functools.partial(make_eval_iterator, val_ds, local, max_batches=section.eval_batches)
    return train_iter, val_batches, steps, len(train_ds)


def loop_config(section, steps: int, seed: int) -> LoopConfig:
    """The training loop's settings from a stage section (distill or finetune) of the config."""
    return LoopConfig(
        seed=seed,
        max_steps=steps, eval_every=section.eval_every, checkpoint_every=section.checkpoint_every,
        log_every=section.log_every, grad_accum=section.optim.grad_accum, batch_size=section.batch_size,
        eval_batches=section.eval_batches, optim=section.optim, snapshot_every=section.snapshot_every,
    )


def _train_stage(ctx: RunContext, name: str, section, model: Llama, trainable_filter, loss_fn) -> dict:
    split = split_model(model, trainable_filter)
    train_iter, val_batches, steps, n_chunks = _data(ctx, section, section.batch_size, section.optim.grad_accum, ctx.cfg.run.seed)
    if steps <= 0:
        raise UserError(f"{name}: {n_chunks} training chunks give no optimizer step (batch {section.batch_size} × accum {section.optim.grad_accum})")
    tokens_per_step = section.batch_size * section.optim.grad_accum * section.data.chunk_size
    res = train_loop(
        name=name, split=split, loss_fn=loss_fn, mesh=ctx.mesh, cfg=loop_config(section, steps, ctx.cfg.run.seed),
        train_iter=train_iter, val_batches=val_batches, stage_dir=ctx.stage_dir(name), run_dir=ctx.run_dir,
        tokens_per_batch=tokens_per_step, is_main=ctx.is_main,
    )
    summary = {
        "stage": name, "steps": res.steps, "trainable_params": res.trainable_params,
        "initial_eval_loss": res.initial_eval, "best_eval_loss": res.best_eval, "final_eval_loss": res.final_eval,
        "tokens_per_s": res.tokens_per_s, "train_chunks": n_chunks, "resumed_from": res.resumed_from,
    }
    save_params(ctx.stage_dir(name) / "final", res.trainable, summary)
    mark_done(ctx, name, summary)
    return summary


def run_distill(ctx: RunContext) -> dict:
    """Stage 1: train feature maps and window factors (fp32 master weights) against the frozen softmax teacher."""
    d = ctx.cfg.distill
    if ctx.cfg.attention.kind != "lolcats":
        raise UserError("distill: attention.kind is 'softmax' — nothing to linearize")
    model = load_base(ctx, linearize=True)
    loss_fn = functools.partial(distill_loss, mse_factor=d.mse_factor, xent_factor=d.xent_factor)
    return _train_stage(ctx, "distill", d, model, nnx.Any(FeatureMapParam, WindowParam), loss_fn)


def attention_source_stage(ctx: RunContext) -> str:
    """Where the trained attention parameters come from: `stitch` (block-wise path) if it ran, else `distill`."""
    return "stitch" if (ctx.stage_dir("stitch") / "final").exists() else "distill"


def run_finetune(ctx: RunContext) -> dict:
    """Stage 2: LoRA on the linearized model (feature maps and window factors frozen unless lora.train_attention)."""
    f = ctx.cfg.finetune
    model = load_base(ctx, linearize=ctx.cfg.attention.kind == "lolcats", lora=f.lora)
    if ctx.cfg.attention.kind == "lolcats":
        load_stage_params(ctx, model, attention_source_stage(ctx))
    filt = nnx.Any(LoraParam, FeatureMapParam, WindowParam) if f.lora.train_attention else LoraParam
    return _train_stage(ctx, "finetune", f, model, filt, finetune_loss_fn(f))
