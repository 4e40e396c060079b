"""Import an original LoLCATS checkpoint (HazyResearch/lolcats `.pt`, or safetensors in its layout) as a run directory.

    python -m convert.from_lolcats --base HF_DIR --ckpt FILE [--ckpt FILE2] --out RUNDIR
        [--window tk|sw] [--window-size 64] [--feature-dim 64] [--feature-map softmax_dim] [--no-fullspace]
        [--affine] [--no-compat] [--lora-alpha A] [--dtype float32|bfloat16]

The checkpoint files (e.g. the released `*_distill.pt` with feature maps and window factors, and `*_ft.pt` with LoRA
adapters, or one combined file) are read with `convert.lolcats_format` (key prefixes, the `window_factor` alias and
the `model_state_dict` wrapper are accepted). Linearized layers are the ones with feature maps; every other layer
stays softmax. The feature dim F and LoRA rank r come from the tensor shapes; LoRA α is not stored in the original
files: `--lora-alpha`, default 2·r (the released checkpoints: α=16 for r=8, α=8 for r=4).

The result is a lolcats_jax run directory that `lolcats_jax.inference.run_model.load_run_model` (and so generation,
evaluation and `convert.to_hf`) loads: `config.yaml` (base model = HF_DIR, attention.compat = true by default: the
original end-aligned terraced masks and sliding-window decoding, reference §3.4/§3.8), `distill/final` (feature maps
and window logits) and, with LoRA, `finetune/final`, each with a `done.json`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from convert.errors import ConversionError
from convert.hf_to_flax import read_config
from convert.lolcats_format import ParsedCheckpoint, parse_checkpoint, read_checkpoint_file
from lolcats_jax.cli import command


def _read_all(paths: Sequence[str | Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for p in paths:
        for k, v in read_checkpoint_file(p).items():
            if k in tensors:
                raise ConversionError(f"{p}: key {k!r} also appears in an earlier --ckpt file")
            tensors[k] = v
    return tensors


def run_config(base_dir: Path, out: Path, parsed: ParsedCheckpoint, attention: dict, lora_alpha: float | None,
               param_dtype: str) -> dict:
    """The config.yaml of the imported run."""
    cfg = {
        "run": {"dir": str(out), "seed": 0, "stages": ["distill", "finetune"] if parsed.rank else ["distill"]},
        "model": {"path": str(base_dir), "param_dtype": param_dtype, "compute_dtype": "float32", "remat": False},
        "attention": {"kind": "lolcats", **attention},
    }
    if parsed.rank:
        cfg["finetune"] = {"lora": {"rank": int(parsed.rank), "alpha": float(lora_alpha),
                                    "targets": list(parsed.lora_targets)}}
    return cfg


def import_lolcats(
    base_dir: str | Path,
    ckpt_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    window: str = "tk",
    window_size: int = 64,
    feature_dim: int | None = None,
    feature_map: str = "softmax_dim",
    fullspace: bool = True,
    eps: float = 1e-12,
    affine: bool = False,
    compat: bool = True,
    lora_alpha: float | None = None,
    param_dtype: str = "float32",
) -> Path:
    """Writes the run directory `out_dir` (must be new or empty) for `ckpt_paths` on the base model `base_dir`."""
    base_dir, out = Path(base_dir).absolute(), Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: exists and is not an empty directory; refusing to overwrite")
    cfg = read_config(base_dir)
    where = ", ".join(str(p) for p in ckpt_paths)
    parsed = parse_checkpoint(_read_all(ckpt_paths), cfg, where)
    if not parsed.lin_layers:
        raise ConversionError(f"{where}: no feature maps (…self_attn.feature_map_q.mlp.layer) — pass the attention-"
                              f"transfer (distill) checkpoint too")
    F = parsed.fmap_q.shape[-1]
    if feature_dim is not None and feature_dim != F:
        raise ConversionError(f"{where}: feature maps have feature dim {F}, but --feature-dim {feature_dim} was given")
    if parsed.rank and lora_alpha is None:
        lora_alpha = 2.0 * parsed.rank
        print(f"note: LoRA rank {parsed.rank} found; alpha is not stored in LoLCATS checkpoints, using "
              f"--lora-alpha {lora_alpha:g} (2·r, as the released checkpoints: 16 for r=8)", file=sys.stderr)
    attention = {
        "form": "hybrid", "window": window, "window_size": int(window_size), "feature_map": feature_map,
        "fullspace": bool(fullspace), "feature_dim": int(F), "feature_bias": parsed.fbias_q is not None,
        "eps": float(eps), "affine": bool(affine), "compat": bool(compat),
        "softmax_layers": [i for i in range(cfg.num_layers) if i not in parsed.lin_layers],
    }
    config_text = yaml.safe_dump(run_config(base_dir, out, parsed, attention, lora_alpha, param_dtype), sort_keys=False)
    _check_config(config_text)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_run(out, parsed, ckpt_paths, config_text)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _check_config(text: str) -> None:
    """Parses the config we are about to write with the project's loader (so bad options fail before writing)."""
    from lolcats_jax.config import ConfigError, load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        try:
            load_config(path)
        except ConfigError as e:
            raise ConversionError(f"invalid import options: {str(e).replace(str(path) + ': ', '')}") from None


def _write_run(out: Path, parsed: ParsedCheckpoint, ckpt_paths: Sequence[str | Path], config_text: str) -> None:
    import jax.numpy as jnp

    from lolcats_jax.fsio import write_json_atomic, write_text_atomic
    from lolcats_jax.train.ckpt import save_params

    source = {"imported_from": [str(Path(p).absolute()) for p in ckpt_paths]}
    stages = {"distill": {"lolcats/fmap_q": parsed.fmap_q, "lolcats/fmap_k": parsed.fmap_k,
                          "lolcats/window_logit": parsed.window_logit}}
    if parsed.fbias_q is not None:
        stages["distill"].update({"lolcats/fbias_q": parsed.fbias_q, "lolcats/fbias_k": parsed.fbias_k})
    if parsed.rank:
        stages["finetune"] = {f"lora/{k}": v for k, v in parsed.lora.items()}
    for stage, params in stages.items():
        summary = {"stage": stage, **source}
        save_params(out / stage / "final", {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, summary)
        write_json_atomic(out / stage / "done.json", summary)
    write_text_atomic(out / "config.yaml", config_text)


@command
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.from_lolcats", description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="Hugging Face directory of the base Llama")
    ap.add_argument("--ckpt", required=True, action="append", help=".pt or .safetensors file (repeatable)")
    ap.add_argument("--out", required=True, help="run directory to create (must be new or empty)")
    ap.add_argument("--window", default="tk", choices=["tk", "sw"])
    ap.add_argument("--window-size", type=int, default=64)
    ap.add_argument("--feature-dim", type=int, default=None, help="check the feature dim (default: from the shapes)")
    ap.add_argument("--feature-map", default="softmax_dim", choices=["softmax_dim", "exp_dim", "relu", "pos_elu"])
    ap.add_argument("--no-fullspace", dest="fullspace", action="store_false", help="f(u) instead of [f(u); f(-u)]")
    ap.add_argument("--eps", type=float, default=1e-12)
    ap.add_argument("--affine", action="store_true", help="linear factor 1 - gamma instead of 1")
    ap.add_argument("--no-compat", dest="compat", action="store_false",
                    help="this project's start-aligned masks and consistent decoding instead of the original's")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2·rank)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="base weight dtype")
    args = ap.parse_args(argv)
    out = import_lolcats(args.base, args.ckpt, args.out, window=args.window, window_size=args.window_size,
                         feature_dim=args.feature_dim, feature_map=args.feature_map, fullspace=args.fullspace,
                         eps=args.eps, affine=args.affine, compat=args.compat, lora_alpha=args.lora_alpha,
                         param_dtype=args.dtype)
    print(f"wrote run directory {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
