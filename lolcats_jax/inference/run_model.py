"""The model a run directory describes: the base model of its config, linearized as its attention section says,
with the trained attention parameters (`distill` or `stitch`) and LoRA adapters (`finetune`) of the finished
stages loaded on top."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

from lolcats_jax.config import load_config
from lolcats_jax.errors import CheckpointError
from lolcats_jax.model.llama_config import LlamaConfig
from lolcats_jax.sharding import MeshShape, make_mesh


def load_run_model(run_dir: str | os.PathLike, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                   upto: str | None = None):
    """(model, tokenizer) of a run directory. `upto="distill"` ignores a finetune result (the model right after
    attention transfer); default: every finished stage. `dtype` overrides model.param_dtype/compute_dtype."""
    from lolcats_jax.tokenizer import load_tokenizer
    from lolcats_jax.train.stages import RunContext, attention_source_stage, load_base, load_stage_params

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype=dtype, compute_dtype=dtype))
    if mesh is None:
        mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    ctx = RunContext(cfg=cfg, run_dir=run_dir, mesh=mesh, llama_cfg=LlamaConfig.from_hf_dir(cfg.model.path), tokenizer=None)
    linear = cfg.attention.kind == "lolcats"
    use_ft = upto != "distill" and (run_dir / "finetune" / "final").exists()
    if linear and not (run_dir / attention_source_stage(ctx) / "final").exists():
        raise CheckpointError(f"{run_dir}: no trained attention parameters yet (run the distill stage first)")
    model = load_base(ctx, linearize=linear, lora=cfg.finetune.lora if use_ft else None)
    if linear:
        load_stage_params(ctx, model, attention_source_stage(ctx))
    if use_ft:
        load_stage_params(ctx, model, "finetune")
    return model, load_tokenizer(cfg.model.path)
