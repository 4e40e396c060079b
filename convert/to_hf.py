"""Export a linearized model (a run directory's result) to Hugging Face, or to the original LoLCATS checkpoint layout.

    python -m convert.to_hf --run RUNDIR --out DIR [--format hf|lolcats] [--dtype float32|bfloat16]

`--format hf` (default) writes a directory that `transformers.AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` loads offline:

    config.json               Llama fields + model_type "lolcats_llama", auto_map, and a `lolcats` section
    model*.safetensors        base weights with LoRA merged in: W ← W + (α/r)·B A (every target, MLP included), plus
                              model.layers.{i}.self_attn.feature_map_{q,k}.weight (H, D, F),
                              model.layers.{i}.self_attn.feature_map_{q,k}.bias (H,)   (feature_bias only),
                              model.layers.{i}.self_attn.window_factors (H,)            (logits θ, γ = sigmoid θ)
                              for every linearized layer i (feature maps / window factors always float32)
    configuration_lolcats.py, modeling_lolcats.py   the PyTorch model (convert/hf_modeling/)
    tokenizer files           copied from the base model directory

`--format lolcats` writes what the original repository's scripts load (see `convert.lolcats_format`):
`DIR/lolcats_distill.pt` (feature maps, window factors), `DIR/lolcats_ft.pt` (attention LoRA, PEFT names),
`model_config.yaml` / `finetune_config.yaml` stubs and `lolcats_config.json`. A run trained with the default
`attention.compat: false` and terraced (tk) windows is refused unless `--allow-noncompat`: the original evaluates
those weights with other masks.

`--dtype` sets the dtype of the base weights (hf; default the model's own) or of every tensor (lolcats; default
bfloat16, as the original stores them). The output
directory must be new or empty; files are written under temporary names and renamed, and removed again on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from convert.errors import ConversionError
from convert.flax_to_hf import TOKENIZER_FILES, _copy, _param, _to_host, _write_dir
from convert.keymap import param_maps
from convert.safetensors_io import TensorSpec, write_sharded
from lolcats_jax.cli import command
from lolcats_jax.fsio import write_bytes_atomic
from lolcats_jax.model import Llama

MODELING_DIR = Path(__file__).resolve().parent / "hf_modeling"
MODELING_FILES = ("configuration_lolcats.py", "modeling_lolcats.py")
MODEL_TYPE = "lolcats_llama"
AUTO_MAP = {
    "AutoConfig": "configuration_lolcats.LolcatsLlamaConfig",
    "AutoModel": "modeling_lolcats.LolcatsLlamaModel",
    "AutoModelForCausalLM": "modeling_lolcats.LolcatsLlamaForCausalLM",
}
# our base parameter -> LoRA target adapting it
LORA_TARGET_OF = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w_gate": "gate", "w_up": "up", "w_down": "down"}
OUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jax.numpy.bfloat16)}


def lolcats_hf_names(layer: int) -> dict[str, str]:
    """Our lolcats parameter → its HF tensor name for decoder layer `layer`."""
    pre = f"model.layers.{layer}.self_attn."
    return {
        "fmap_q": pre + "feature_map_q.weight",
        "fmap_k": pre + "feature_map_k.weight",
        "fbias_q": pre + "feature_map_q.bias",
        "fbias_k": pre + "feature_map_k.bias",
        "window_logit": pre + "window_factors",
    }


def lolcats_section(model: Llama) -> dict:
    """The `lolcats` object of config.json for `model`."""
    lo, lora = model.opts.lolcats, model.opts.lora
    return {
        "form": lo.form, "window": lo.window, "window_size": lo.window_size, "feature_map": lo.feature_map,
        "fullspace": lo.fullspace, "feature_dim": lo.feature_dim, "feature_bias": lo.feature_bias, "eps": lo.eps,
        "affine": lo.affine, "compat": lo.compat, "layer_kinds": list(model.kinds),
        "softmax_layers": [i for i, k in enumerate(model.kinds) if k == "softmax"],
        "base_model_type": model.cfg.model_type,
        "lora": None if lora is None else {"merged": True, "rank": lora.rank, "alpha": lora.alpha,
                                          "targets": list(lora.targets)},
    }


def _merged_block(model: Llama, name: str, layer: int, expert: int | None = None) -> np.ndarray:
    """Layer `layer` of base parameter `name` (expert `expert`'s matrix of it for expert MLPs) with its LoRA update
    (α/r)·A B folded in (computed in float64)."""
    at = (layer,) if expert is None else (layer, expert)
    block = _to_host(_param(model, ("layers", name))[at])
    lora, target = model.opts.lora, LORA_TARGET_OF.get(name)
    if lora is None or target not in lora.targets:
        return block
    a = _to_host(getattr(model.lora, f"{target}_a")[...][at]).astype(np.float64)
    b = _to_host(getattr(model.lora, f"{target}_b")[...][at]).astype(np.float64)
    delta = a.reshape(-1, lora.rank) @ b.reshape(lora.rank, -1)
    merged = block.astype(np.float64) + lora.scale * delta.reshape(block.shape)
    return merged.astype(block.dtype)


def merged_base_specs(model: Llama, dtype: np.dtype | None = None) -> list[TensorSpec]:
    """One TensorSpec per HF base tensor (HF order), LoRA merged, cast to `dtype` (default: the parameter's)."""
    specs: list[TensorSpec] = []
    for pm in param_maps(model.cfg):
        arr = _param(model, pm.path)
        if tuple(arr.shape) != pm.shape:
            raise ConversionError(f"parameter {'.'.join(pm.path)} has shape {arr.shape}, expected {pm.shape}")
        out_dtype = np.dtype(dtype if dtype is not None else arr.dtype)

        def block(layer: int | None, expert: int | None, arr=arr, path=pm.path) -> np.ndarray:
            if layer is None:
                return _to_host(arr)
            return _merged_block(model, path[1], layer, expert)

        for name, get in pm.hf_items(block):
            specs.append(TensorSpec(name, pm.hf_shape, out_dtype, _cast(get, out_dtype)))
    return specs


def _cast(get: Callable[[], np.ndarray], dtype: np.dtype) -> Callable[[], np.ndarray]:
    return lambda: np.ascontiguousarray(get().astype(dtype, copy=False))


def lolcats_specs(model: Llama) -> list[TensorSpec]:
    """Feature maps, biases and window logits of every linearized layer under HF names, float32."""
    specs: list[TensorSpec] = []
    if not model.lin_layers:
        return specs
    names = [n for n in ("fmap_q", "fmap_k", "fbias_q", "fbias_k", "window_logit") if hasattr(model.lolcats, n)]
    for n, layer in enumerate(model.lin_layers):
        hf = lolcats_hf_names(layer)
        for name in names:
            arr = getattr(model.lolcats, name)[...]
            get = (lambda arr=arr, n=n: _to_host(arr[n]))
            specs.append(TensorSpec(hf[name], tuple(arr.shape[1:]), np.dtype(np.float32), _cast(get, np.dtype(np.float32))))
    return specs


def hf_config(model: Llama, dtype: np.dtype) -> dict:
    cfg = model.cfg.to_hf_dict()
    if model.cfg.model_type in ("qwen2", "qwen3"):  # read by transformers' Qwen attention of the softmax layers
        cfg["layer_types"] = ["full_attention"] * model.cfg.num_layers
    cfg.update(architectures=["LolcatsLlamaForCausalLM"], model_type=MODEL_TYPE, auto_map=dict(AUTO_MAP),
               dtype=np.dtype(dtype).name, lolcats=lolcats_section(model))
    return cfg


def _tokenizer_files(tokenizer_dir: str | Path | None) -> list[Path]:
    if tokenizer_dir is None:
        return []
    src = Path(tokenizer_dir)
    files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not files:
        raise ConversionError(f"{src}: no tokenizer files (looked for {list(TOKENIZER_FILES)})")
    return files


def export_linearized(
    model: Llama,
    tokenizer_dir: str | Path | None,
    out_dir: str | Path,
    *,
    format: str = "hf",
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    allow_noncompat: bool = False,
) -> list[Path]:
    """Writes `model` as a Hugging Face directory (format "hf") or an original-layout LoLCATS checkpoint ("lolcats");
    returns the files written (nothing off process 0, which only takes part in the gathers)."""
    if format not in ("hf", "lolcats"):
        raise ConversionError(f"format={format!r} must be 'hf' or 'lolcats'")
    if dtype is not None and dtype not in OUT_DTYPES:
        raise ConversionError(f"dtype={dtype!r} must be one of {sorted(OUT_DTYPES)}")
    out_dtype = None if dtype is None else OUT_DTYPES[dtype]
    out = Path(out_dir)
    if format == "lolcats":
        from convert.lolcats_format import write_lolcats_checkpoint

        if jax.process_index() != 0:
            return []
        base = None if tokenizer_dir is None else str(tokenizer_dir)

        def write_lolcats(d: Path, written: list[Path]) -> None:
            written.extend(write_lolcats_checkpoint(model, d, out_dtype, base_path=base,
                                                    allow_noncompat=allow_noncompat))

        return _write_dir(out, write_lolcats)

    tok_files = _tokenizer_files(tokenizer_dir)
    specs = merged_base_specs(model, out_dtype) + lolcats_specs(model)
    if jax.process_index() != 0:
        for s in specs:
            s.get()
        return []

    def write(d: Path, written: list[Path]) -> None:
        written += write_sharded(d, specs, max_shard_size=max_shard_size, metadata={"format": "pt"})
        config = hf_config(model, specs[0].dtype)
        write_bytes_atomic(d / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        written.append(d / "config.json")
        for name in MODELING_FILES:
            _copy(MODELING_DIR / name, d / name, written)
        for f in tok_files:
            _copy(f, d / f.name, written)

    return _write_dir(out, write)


@command
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.to_hf", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="lolcats_jax run directory (config.yaml + stage results)")
    ap.add_argument("--out", required=True, help="directory to create (must be new or empty)")
    ap.add_argument("--format", default="hf", choices=["hf", "lolcats"])
    ap.add_argument("--dtype", default=None, choices=sorted(OUT_DTYPES), help="default: the model's own dtype")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (hf format)")
    ap.add_argument("--allow-noncompat", action="store_true",
                    help="lolcats format: write a run trained with attention.compat: false (tk) anyway")
    args = ap.parse_args(argv)
    from lolcats_jax.config import load_config
    from lolcats_jax.errors import CheckpointError
    from lolcats_jax.inference.run_model import load_run_model

    try:
        model, _ = load_run_model(args.run)
        tokenizer_dir = load_config(Path(args.run) / "config.yaml").model.path
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConversionError(f"{args.run}: cannot load the run's model ({e})") from None
    written = export_linearized(model, tokenizer_dir, args.out, format=args.format, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, allow_noncompat=args.allow_noncompat)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
