"""Loading a model for inference from a Hugging Face directory (softmax models) or an Orbax checkpoint."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import jax

from lolcats_jax.model.llama import Llama
from lolcats_jax.model.options import ModelOptions


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_dir(path: str | os.PathLike) -> tuple[str, Path]:
    """('hf', dir) for a Hugging Face directory, ('run', dir) for a lolcats_jax run directory."""
    p = Path(path)
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return "hf", p
    if (p / "config.yaml").is_file():
        return "run", p
    raise ModelNotFoundError(
        f"{p}: neither a Hugging Face model directory (config.json + *.safetensors) nor a lolcats_jax run directory (config.yaml)"
    )


def load_hf_model(path: str | os.PathLike, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
                  opts: ModelOptions | None = None, seed: int = 0) -> Llama:
    from convert.hf_to_flax import load_hf_params

    opts = opts or ModelOptions(param_dtype=dtype, compute_dtype=dtype)
    return load_hf_params(path, mesh, param_dtype=dtype, opts=opts, seed=seed)


def load_for_generation(path: str | os.PathLike, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None):
    """(model, tokenizer) for `python -m lolcats_jax.generate` / evaluation, sharded over `mesh` (default: one
    device)."""
    from lolcats_jax.tokenizer import load_tokenizer

    kind, p = resolve_model_dir(path)
    if kind == "hf":
        return load_hf_model(p, dtype=dtype, mesh=mesh), load_tokenizer(p)
    from lolcats_jax.inference.run_model import load_run_model  # the recipe's run directories (train issue)

    return load_run_model(p, dtype=dtype, mesh=mesh)


def mesh_scope(mesh: jax.sharding.Mesh | None):
    """`mesh` as the current mesh for the block (nothing when None: one device)."""
    from lolcats_jax import compat

    return compat.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def cli_mesh(spec: str | None) -> jax.sharding.Mesh | None:
    """The mesh of an inference CLI's `--mesh data=..,fsdp=..,tensor=..` (None: one device)."""
    if spec is None:
        return None
    from lolcats_jax.errors import UserError
    from lolcats_jax.sharding import make_mesh, parse_mesh_shape

    try:
        return make_mesh(parse_mesh_shape(spec))
    except ValueError as e:
        raise UserError(f"--mesh {spec}: {e}") from None
