"""The `export` stage: the run's final model as a Hugging Face directory (`<run.dir>/export/hf`, LoRA merged, our
PyTorch modeling file for `trust_remote_code`), built in a hidden sibling and renamed into place by
`convert.to_hf`, so `export/hf` exists only when complete."""

from __future__ import annotations

from lolcats_jax.fsio import remove_dir
from lolcats_jax.train.stages import RunContext


def run_export(ctx: RunContext) -> dict:
    from convert.to_hf import export_linearized
    from lolcats_jax.inference.run_model import load_run_model

    out = ctx.stage_dir("export") / "hf"
    if ctx.is_main:  # an earlier export whose stage did not finish (the writer refuses non-empty directories)
        remove_dir(out)
    model, _ = load_run_model(ctx.run_dir, mesh=ctx.mesh)
    written = export_linearized(model, ctx.cfg.model.path, out)
    return {"dir": str(out), "files": len(written)}
