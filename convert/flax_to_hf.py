"""Export the base weights of a `Llama` to a Hugging Face directory (config.json + safetensors).

    python -m convert.flax_to_hf --ckpt CKPT_DIR --out DIR [--tokenizer-from HF_DIR] [--max-shard-size 5GB]

`export_hf(model, out_dir)` writes `config.json` (`LlamaConfig.to_hf_dict` plus the dtype) and the weights in
the parameters' own dtype, so HF → Flax → HF is bit-exact. Tensors are streamed: each HF tensor is one layer
(or the whole of an unstacked parameter) gathered to the host with `jax.device_get` when the writer reaches it,
so host memory stays near one tensor. Models bigger than `max_shard_size` get several shards plus
`model.safetensors.index.json`. LoLCATS / LoRA parameters are not exported (an HF Llama has no place for them).

The output directory must be new or empty. Every file goes through a temporary name and a rename; on failure
everything this call put there is removed again (and the directory, if it created it).

Multi-host: every process must call `export_hf` (the per-tensor gathers of arrays that are not fully addressable
are collectives, `multihost_utils.process_allgather`); only process 0 writes files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from convert.errors import ConversionError
from convert.keymap import param_maps
from convert.safetensors_io import TensorSpec, write_sharded
from lolcats_jax.cli import command
from lolcats_jax.fsio import commit_dir, copy_atomic, remove_stale, staging_dir, write_bytes_atomic
from lolcats_jax.model import Llama

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _param(model: Llama, path: tuple[str, ...]) -> jax.Array:
    obj = model
    for name in path:
        obj = getattr(obj, name)
    assert isinstance(obj, nnx.Variable), path
    return obj[...]


def hf_tensor_specs(model: Llama) -> list[TensorSpec]:
    """One TensorSpec per HF tensor, in HF order; `get()` gathers that tensor (one layer) to the host."""
    specs: list[TensorSpec] = []
    for pm in param_maps(model.cfg):
        arr = _param(model, pm.path)
        if tuple(arr.shape) != pm.shape:
            raise ConversionError(f"parameter {'.'.join(pm.path)} has shape {arr.shape}, expected {pm.shape} from the config")
        dtype = np.dtype(arr.dtype)

        def block(layer: int | None, expert: int | None, arr: jax.Array = arr) -> np.ndarray:
            return _to_host(arr if layer is None else arr[layer] if expert is None else arr[layer, expert])

        for name, get in pm.hf_items(block):
            specs.append(TensorSpec(name, pm.hf_shape, dtype, get))
    return specs


def _hf_config(model: Llama, dtype: np.dtype) -> dict:
    out = model.cfg.to_hf_dict()
    out["dtype"] = np.dtype(dtype).name
    return out


def export_hf(
    model: Llama,
    out_dir: str | Path,
    *,
    tokenizer_from: str | Path | None = None,
    max_shard_size: int | str = "5GB",
) -> list[Path]:
    """Writes `model`'s base weights as an HF directory; returns the files written (empty off process 0)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: exists and is not an empty directory; refusing to overwrite")
    tok_files: list[Path] = []
    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        tok_files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
        if not tok_files:
            raise ConversionError(f"{src}: no tokenizer files (looked for {list(TOKENIZER_FILES)})")
    specs = hf_tensor_specs(model)
    if jax.process_index() != 0:
        for s in specs:  # take part in the collective gathers, write nothing
            s.get()
        return []

    def write(d: Path, written: list[Path]) -> None:
        written += write_sharded(d, specs, max_shard_size=max_shard_size)
        config = _hf_config(model, specs[0].dtype)
        write_bytes_atomic(d / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        written.append(d / "config.json")
        for f in tok_files:
            _copy(f, d / f.name, written)

    return _write_dir(out, write)


def _write_dir(out: Path, write: Callable[[Path, list[Path]], None]) -> list[Path]:
    """Builds the new/empty directory `out` as a whole: `write(staging, written)` fills a hidden sibling, which is
    renamed to `out` only when complete — a kill or an error at any moment leaves no `out` that looks finished
    (a leftover `.<name>.staging-*` sibling is removed by the next export). Returns the final paths."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: exists and is not an empty directory; refusing to overwrite")
    remove_stale(out)
    staging = staging_dir(out)
    written: list[Path] = []
    try:
        write(staging, written)
        if out.exists():
            out.rmdir()  # the empty directory the caller may have prepared
        commit_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / p.relative_to(staging) for p in written]


def _copy(src: Path, dst: Path, written: list[Path]) -> None:
    copy_atomic(src, dst)
    written.append(dst)


@command
def main(argv: Sequence[str] | None = None) -> int:
    from convert.checkpoint import load_checkpoint
    from convert.hf_to_flax import parse_mesh
    from lolcats_jax import sharding as shd

    ap = argparse.ArgumentParser(prog="python -m convert.flax_to_hf", description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="Orbax checkpoint directory (convert.checkpoint layout)")
    ap.add_argument("--out", required=True, help="HF directory to create (must be new or empty)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--tokenizer-from", default=None, help="copy tokenizer files from this HF directory")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="mesh to restore the checkpoint onto")
    args = ap.parse_args(argv)
    try:
        mesh = shd.make_mesh(parse_mesh(args.mesh))
    except ValueError as e:
        raise ConversionError(str(e)) from None
    model = load_checkpoint(args.ckpt, mesh, step=args.step)
    written = export_hf(model, args.out, tokenizer_from=args.tokenizer_from, max_shard_size=args.max_shard_size)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
