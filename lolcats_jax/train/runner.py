"""Runs the stages a config lists, in order, into `run.dir`; finished stages are skipped, an interrupted one
resumes from its last checkpoint."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import jax

from lolcats_jax import compat
from lolcats_jax.config import Config
from lolcats_jax.errors import UserError
from lolcats_jax.fsio import write_json_atomic
from lolcats_jax.model.llama_config import LlamaConfig
from lolcats_jax.sharding import make_mesh
from lolcats_jax.train.run_dir import prepare_run_dir
from lolcats_jax.train.stages import RunContext, clear_done, mark_done, run_distill, run_finetune, stage_done


def _stage_fns() -> dict[str, Callable[[RunContext], dict]]:
    from lolcats_jax.blockwise.stages import BLOCKWISE_STAGES
    from lolcats_jax.train.export_stage import run_export
    from lolcats_jax.eval.stage import run_evaluate

    return {"distill": run_distill, "finetune": run_finetune, "evaluate": run_evaluate, "export": run_export,
            **BLOCKWISE_STAGES}


def build_context(cfg: Config) -> RunContext:
    from lolcats_jax.tokenizer import load_tokenizer

    llama_cfg = LlamaConfig.from_hf_dir(cfg.model.path)
    mesh = make_mesh(cfg.mesh.shape())
    tok_path = cfg.distill.data.tokenizer or cfg.model.path
    return RunContext(
        cfg=cfg, run_dir=Path(cfg.run.dir), mesh=mesh, llama_cfg=llama_cfg, tokenizer=load_tokenizer(tok_path),
        process_index=jax.process_index(), process_count=jax.process_count(),
    )


def run(cfg: Config, config_path: str | None = None, only_stage: str | None = None, force_config: bool = False) -> dict:
    run_dir, cfg = prepare_run_dir(cfg, is_main=jax.process_index() == 0, force_config=force_config)
    fns = _stage_fns()
    stages = [only_stage] if only_stage else list(cfg.run.stages)
    for s in stages:
        if s not in fns:
            raise UserError(f"stage {s!r} is not available in this build (available: {sorted(fns)})")
    ctx = build_context(cfg)
    results = {}
    with compat.set_mesh(ctx.mesh):
        for s in stages:
            done = stage_done(ctx, s)
            if done is not None and only_stage is None:
                print(f"[run] stage '{s}' already finished ({run_dir / s / 'done.json'}); skipping", file=sys.stderr)
                results[s] = done
                continue
            t0 = time.perf_counter()
            print(f"[run] stage '{s}' starting", file=sys.stderr, flush=True)
            clear_done(ctx, s)
            summary = fns[s](ctx)
            summary = dict(summary or {}, seconds=round(time.perf_counter() - t0, 1))
            if not summary.get("partial"):  # e.g. distill_block of one block: the stage as a whole is not done
                mark_done(ctx, s, summary)
            results[s] = summary
            print(f"[run] stage '{s}' finished in {summary['seconds']}s", file=sys.stderr, flush=True)
    if ctx.is_main:
        write_json_atomic(run_dir / "summary.json", results)
    return results
