"""The `export` stage: the run's final model as a Hugging Face directory (`<run.dir>/export/hf`, LoRA merged, our
PyTorch modeling file for `trust_remote_code`), written atomically by `convert.to_hf`."""

from __future__ import annotations

import shutil

from lolcats_jax.train.stages import RunContext


def run_export(ctx: RunContext) -> dict:
    from convert.to_hf import export_linearized
    from lolcats_jax.run_model import load_run_model

    out = ctx.stage_dir("export") / "hf"
    if out.exists():  # an interrupted earlier export: the writer refuses non-empty directories
        shutil.rmtree(out)
    model, _ = load_run_model(ctx.run_dir, mesh=ctx.mesh)
    written = export_linearized(model, ctx.cfg.model.path, out)
    return {"dir": str(out), "files": len(written)}
