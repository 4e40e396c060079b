"""Runs the stages a config lists, in order, into `run.dir`; finished stages are skipped, an interrupted one
resumes from its last checkpoint."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import jax

from lolcats_jax import compat
from lolcats_jax.config import Config, dump_config, load_config, to_dict
from lolcats_jax.errors import UserError
from lolcats_jax.model.llama_config import LlamaConfig
from lolcats_jax.sharding import MeshShape, make_mesh
from lolcats_jax.train.stages import RunContext, mark_done, run_distill, run_finetune, stage_done


def _stage_fns() -> dict[str, Callable[[RunContext], dict]]:
    fns: dict[str, Callable[[RunContext], dict]] = {"distill": run_distill, "finetune": run_finetune}
    try:
        from lolcats_jax.train.report import run_evaluate

        fns["evaluate"] = run_evaluate
    except ImportError:
        pass
    try:
        from lolcats_jax.train.export_stage import run_export

        fns["export"] = run_export
    except ImportError:
        pass
    try:
        from lolcats_jax.blockwise.stages import BLOCKWISE_STAGES

        fns.update(BLOCKWISE_STAGES)
    except ImportError:
        pass
    return fns


def prepare_run_dir(cfg: Config, config_path: str | None) -> Path:
    run_dir = Path(cfg.run.dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run.dir={run_dir}: cannot write there ({e.strerror})") from None
    saved = run_dir / "config.yaml"
    if saved.exists():
        previous = load_config(saved)
        changed = _changed_keys(to_dict(previous), to_dict(cfg))
        if changed and any(stage_done_path(run_dir, s) for s in cfg.run.stages):
            print(f"[run] note: config differs from the one saved in {saved} in {changed}; finished stages are kept", file=sys.stderr)
    if jax.process_index() == 0:
        dump_config(cfg, saved)
    return run_dir


def stage_done_path(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / "done.json").exists()


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _changed_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def build_context(cfg: Config) -> RunContext:
    from lolcats_jax.tokenizer import load_tokenizer

    llama_cfg = LlamaConfig.from_hf_dir(cfg.model.path)
    mesh = make_mesh(MeshShape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    tok_path = cfg.distill.data.tokenizer or cfg.model.path
    return RunContext(
        cfg=cfg, run_dir=Path(cfg.run.dir), mesh=mesh, llama_cfg=llama_cfg, tokenizer=load_tokenizer(tok_path),
        process_index=jax.process_index(), process_count=jax.process_count(),
    )


def run(cfg: Config, config_path: str | None = None, only_stage: str | None = None) -> dict:
    run_dir = prepare_run_dir(cfg, config_path)
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
            summary = fns[s](ctx)
            summary = dict(summary or {}, seconds=round(time.perf_counter() - t0, 1))
            if not summary.get("partial"):  # e.g. distill_block of one block: the stage as a whole is not done
                mark_done(ctx, s, summary)
            results[s] = summary
            print(f"[run] stage '{s}' finished in {summary['seconds']}s", file=sys.stderr, flush=True)
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(results, indent=2, default=str))
    return results
