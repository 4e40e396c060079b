"""Stage `stitch`: every block's trained attention parameters in the full model's layout, as `<run.dir>/stitch/final`.

Notation: N linearized layers of the full model, n of a block, H heads, D head dim, F feature dim.

A block's `final/` holds {"lolcats/fmap_q": (n, H, D, F), …}; the full layout stacks them over N, the block of
linearized layers [lin_start, lin_stop) at that offset — the same keys and shapes `distill/final` has, so
`finetune` (which prefers `stitch/final` when present) loads it unchanged. Refused: a layer covered by no block
or by two, a block directory without a result, blocks from different collects, attention settings that differ
between blocks or from the config, shapes that do not match the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lolcats_jax.blockwise.fingerprint import attention_signature
from lolcats_jax.blockwise.layout import block_dir, partition, store_dir
from lolcats_jax.blockwise.model import attention_keys, full_options
from lolcats_jax.errors import CheckpointError, UserError
from lolcats_jax.train.ckpt import load_params, save_params, saved_keys
from lolcats_jax.train.stages import RunContext


def _block_dirs(run_dir: Path) -> dict[int, Path]:
    root = Path(run_dir) / "distill_block"
    out = {}
    for d in sorted(root.glob("block_*")) if root.is_dir() else []:
        suffix = d.name.split("_", 1)[1]
        if d.is_dir() and suffix.isdigit():
            out[int(suffix)] = d
    return out


def _load_info(d: Path) -> dict[str, Any]:
    for name in ("done.json", "block.json"):
        if not (d / name).is_file():
            raise UserError(f"{d}: block {d.name.split('_', 1)[1]} has no finished result ({name} missing) — train it with --stage distill_block block.index={d.name.split('_', 1)[1]}")
    return json.loads((d / "done.json").read_text())


def check_coverage(ctx: RunContext, infos: dict[int, dict[str, Any]]) -> None:
    """Every layer covered by exactly one block result; names the missing or duplicated block."""
    L, k = ctx.llama_cfg.num_layers, ctx.cfg.block.size
    expected = partition(full_options(ctx.cfg, ctx.llama_cfg).layer_kinds, k)
    owner: dict[int, int] = {}
    for i, info in sorted(infos.items()):
        a, b = info["layers"]
        if not 0 <= a < b <= L:
            raise UserError(f"stitch: block {i} ({block_dir(ctx.run_dir, i)}) covers layers {a}-{b - 1}, outside the model's 0-{L - 1}")
        for layer in range(a, b):
            if layer in owner:
                j = owner[layer]
                raise UserError(
                    f"stitch: layer {layer} is covered twice, by block {j} ({block_dir(ctx.run_dir, j)}, layers "
                    f"{infos[j]['layers'][0]}-{infos[j]['layers'][1] - 1}) and by block {i} ({block_dir(ctx.run_dir, i)}, "
                    f"layers {a}-{b - 1}); remove the duplicated block directory"
                )
            owner[layer] = i
    uncovered = [layer for layer in range(L) if layer not in owner]
    if uncovered:
        names = sorted({blk.describe() for blk in expected for layer in uncovered if blk.start <= layer < blk.stop})
        first = next(blk for blk in expected if blk.start <= uncovered[0] < blk.stop)
        raise UserError(
            f"stitch: no trained result for {', '.join(names)}; run --stage distill_block block.index={first.index} "
            f"(result expected in {block_dir(ctx.run_dir, first.index)}){' and the others' if len(names) > 1 else ''}"
        )


def _check_consistency(ctx: RunContext, infos: dict[int, dict[str, Any]]) -> str:
    """One collect, one attention config (the current one), one model depth; returns the store fingerprint id."""
    ids = {i: info["store_fingerprint_id"] for i, info in infos.items()}
    if len(set(ids.values())) > 1:
        raise UserError(f"stitch: the blocks were trained from different collects (store fingerprint per block: {ids}); retrain the odd ones")
    current = attention_signature(ctx.cfg.attention)
    for i, info in sorted(infos.items()):
        if info["attention"] != current:
            diff = sorted(k for k in current if info["attention"].get(k) != current[k])
            raise UserError(f"stitch: block {i} was trained with attention settings {diff} = {[info['attention'].get(k) for k in diff]}, the config has {[current[k] for k in diff]}")
        if info["num_layers"] != ctx.llama_cfg.num_layers:
            raise UserError(f"stitch: block {i} belongs to a model of {info['num_layers']} layers, this one has {ctx.llama_cfg.num_layers}")
    fp_id = next(iter(ids.values()))
    meta_path = store_dir(ctx.run_dir, ctx.cfg.block.store) / "meta.json"
    if meta_path.is_file():
        store_id = json.loads(meta_path.read_text()).get("fingerprint_id")
        if store_id != fp_id:
            raise UserError(f"stitch: the blocks were trained from collect {fp_id}, but {meta_path} is collect {store_id}")
    else:
        print(f"[stitch] note: {meta_path} is gone; the blocks agree on collect {fp_id}", file=sys.stderr)
    return fp_id


def stitch_params(ctx: RunContext) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """({key: full-layout array}, meta) assembled from the block results; raises UserError on any mismatch."""
    dirs = _block_dirs(ctx.run_dir)
    infos = {i: _load_info(d) for i, d in dirs.items()}
    check_coverage(ctx, infos)
    fp_id = _check_consistency(ctx, infos)
    full = attention_keys(ctx.cfg, ctx.llama_cfg)
    out = {key: np.zeros(shape, dtype) for key, (shape, dtype) in full.items()}
    filled = {key: np.zeros(shape[0], int) for key, (shape, _) in full.items()}
    replicated = NamedSharding(ctx.mesh, P())
    for i, info in sorted(infos.items()):
        lo, hi = info["linear_layers"]
        if hi == lo:
            continue
        final = dirs[i] / "final"
        keys = saved_keys(final)
        if sorted(keys) != sorted(full):
            raise CheckpointError(f"{final}: holds {sorted(keys)}, the full model's attention parameters are {sorted(full)}")
        target = {k: jax.ShapeDtypeStruct((hi - lo, *full[k][0][1:]), full[k][1]) for k in keys}
        params, _ = load_params(final, target, {k: replicated for k in keys})
        for k, v in params.items():
            if tuple(v.shape) != (hi - lo, *full[k][0][1:]):
                raise CheckpointError(f"{final}: {k} has shape {tuple(v.shape)}, expected {(hi - lo, *full[k][0][1:])} for linearized layers {lo}-{hi - 1}")
            out[k][lo:hi] = np.asarray(v.addressable_data(0))
            filled[k][lo:hi] += 1
    for k, f in filled.items():
        if not np.all(f == 1):
            raise UserError(f"stitch: {k} rows {np.nonzero(f != 1)[0].tolist()} are filled {f[f != 1].tolist()} times (expected once each)")
    meta = {
        "stage": "stitch",
        "store_fingerprint_id": fp_id,
        "blocks": {str(i): {"layers": info["layers"], "linear_layers": info["linear_layers"], "dir": str(dirs[i]),
                            "best_eval_loss": info.get("best_eval_loss")} for i, info in sorted(infos.items())},
    }
    return out, meta


def run_stitch(ctx: RunContext) -> dict:
    if ctx.cfg.attention.kind != "lolcats":
        raise UserError("stitch: attention.kind is 'softmax' — there are no attention parameters to stitch")
    params, meta = stitch_params(ctx)
    replicated = NamedSharding(ctx.mesh, P())
    arrays = {k: jax.make_array_from_callback(v.shape, replicated, lambda idx, v=v: v[idx]) for k, v in params.items()}
    save_params(ctx.stage_dir("stitch") / "final", arrays, meta)
    print(f"[stitch] {len(meta['blocks'])} blocks → {ctx.stage_dir('stitch') / 'final'}", file=sys.stderr)
    return dict(meta, params={k: list(v.shape) for k, v in params.items()})
