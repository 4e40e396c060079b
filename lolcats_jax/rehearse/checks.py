"""What a rehearsal verifies on its finished runs: stage markers, trainable parameters against the one-device run,
the exported Hugging Face directory against the JAX model."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def final_dirs(run_dir: Path) -> dict[str, Path]:
    """{name: final parameter directory} of every trained result in a run (distill, each block, stitch, finetune)."""
    out = {}
    for stage in ("distill", "stitch", "finetune"):
        if (run_dir / stage / "final").is_dir():
            out[stage] = run_dir / stage / "final"
    for block in sorted((run_dir / "distill_block").glob("block_*"), key=lambda p: int(p.name.split("_")[1])):
        if (block / "final").is_dir():
            out[f"distill_block/{block.name}"] = block / "final"
    return out


def read_final(path: Path) -> dict[str, np.ndarray]:
    """A `final/` parameter checkpoint on one device, whatever mesh and processes saved it."""
    import jax
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(path.absolute(), item_handlers={"state": ocp.StandardCheckpointHandler()})
    step = mngr.latest_step()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    meta = mngr.item_metadata(step)["state"]
    target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one) for k, m in meta.items()}
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mngr.close()
    return {k: np.asarray(v) for k, v in out["state"].items()}


def compare_params(ref_run: Path, run: Path) -> dict[str, dict]:
    """{result: {max_abs, max_rel, bit_exact, keys}} of every trained result; a result missing on either side is
    reported under "missing"."""
    a, b = final_dirs(ref_run), final_dirs(run)
    out: dict[str, dict] = {}
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            out[name] = {"missing": "reference" if name not in a else "rehearsal"}
            continue
        pa, pb = read_final(a[name]), read_final(b[name])
        if sorted(pa) != sorted(pb):
            out[name] = {"missing": f"keys differ: {sorted(set(pa) ^ set(pb))}"}
            continue
        max_abs = max(float(np.max(np.abs(pa[k].astype(np.float64) - pb[k]))) for k in pa)
        scale = max(float(np.max(np.abs(pa[k]))) for k in pa)
        out[name] = {"keys": len(pa), "max_abs": max_abs, "max_rel": max_abs / scale if scale else max_abs,
                     "bit_exact": all(np.array_equal(pa[k], pb[k]) for k in pa)}
    return out


def _losses(run_dir: Path) -> dict[tuple, float]:
    """{(stage, kind, step): loss} of a run's metrics.jsonl (the last record of a step wins: a resumed run repeats
    the steps after its checkpoint). Block jobs write theirs into their own block directories."""
    import json

    out: dict[tuple, float] = {}
    files = [run_dir / "metrics.jsonl", *sorted((run_dir / "distill_block").glob("block_*/metrics.jsonl"))]
    for f in files:
        if f.is_file():
            for line in f.read_text().splitlines():
                r = json.loads(line)
                if "loss" in r:
                    out[(r["stage"], r["kind"], r["step"])] = float(r["loss"])
    return out


def compare_losses(ref_run: Path, run: Path) -> dict:
    """Every logged train / eval loss of the run against the reference's: {"records", "max_rel", "missing"}."""
    a, b = _losses(ref_run), _losses(run)
    common = sorted(set(a) & set(b))
    rel = [abs(a[k] - b[k]) / max(abs(a[k]), 1e-30) for k in common]
    return {"records": len(common), "max_rel": max(rel) if rel else None,
            "missing": [list(k) for k in sorted(set(a) ^ set(b))][:10]}


def export_matches(run_dir: Path, hf_dir: Path, seed: int = 0) -> dict:
    """Loads `hf_dir` with transformers (its own modeling file) and compares its logits with the run's JAX model
    on random tokens: {"max_rel": …, "files": […]}."""
    import jax.numpy as jnp
    import torch
    import transformers

    from lolcats_jax.inference.run_model import load_run_model

    model, _ = load_run_model(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, local_files_only=True,
                                                           dtype=torch.float32).eval()
    toks = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (2, 21))
    with torch.no_grad():
        ref = hf(torch.tensor(toks), use_cache=False).logits.numpy()
    ours = np.asarray(model(jnp.asarray(toks)))
    return {"max_rel": float(np.abs(ours - ref).max() / np.abs(ref).max()), "files": sorted(p.name for p in hf_dir.iterdir())}
