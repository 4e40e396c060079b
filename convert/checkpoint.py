"""Model parameters as an Orbax checkpoint, restorable onto any mesh.

Layout (one `ocp.CheckpointManager` directory):

    CKPT_DIR/<step>/params/   every nnx.Param of the model (base weights + LoLCATS / LoRA parameters), StandardSave
    CKPT_DIR/<step>/meta/     JSON: {"format", "config": LlamaConfig.to_hf_dict(), "param_dtype", "options"}

Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*``, puts its ``commit_success.txt`` marker in last and
renames it: a step directory with a temporary name or without the marker is refused, never half-read.

Restoring builds the targets as ``jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))`` with
the specs `lolcats_jax.sharding.param_shardings` gives for the *new* mesh (targets taken from `nnx.eval_shape`
under a mesh carry an AbstractMesh and fail to restore), so a checkpoint written on one mesh loads onto another.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding

from convert.errors import ConversionError
from lolcats_jax import sharding as shd
from lolcats_jax.model import Llama, LlamaConfig, LolcatsLayerOptions, LoraOptions, ModelOptions

FORMAT = "lolcats_jax.params/1"
COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, just before renaming the temporary step directory


def is_committed(step_dir: Path) -> bool:
    """True when Orbax finalized `step_dir` (its commit marker exists)."""
    return (step_dir / COMMIT_MARKER).is_file()


def options_to_dict(opts: ModelOptions) -> dict[str, Any]:
    return dataclasses.asdict(opts)


def _build(cls, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConversionError(f"{where}: unknown {cls.__name__} field(s) {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def options_from_dict(d: dict[str, Any], where: str = "options") -> ModelOptions:
    d = dict(d)
    if d.get("lolcats") is not None:
        d["lolcats"] = _build(LolcatsLayerOptions, d["lolcats"], where)
    if d.get("lora") is not None:
        d["lora"] = _build(LoraOptions, d["lora"], where)
    return _build(ModelOptions, d, where)


def _manager(ckpt_dir: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(ckpt_dir.absolute(), item_names=("params", "meta"))


def save_checkpoint(model: Llama, ckpt_dir: str | Path, *, step: int = 0) -> Path:
    """Saves every nnx.Param of `model` plus its metadata as step `step`; returns the step directory."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / str(step)).exists():
        raise ConversionError(f"{ckpt_dir / str(step)}: already exists; choose another --out or step")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    meta = {
        "format": FORMAT,
        "config": model.cfg.to_hf_dict(),
        "param_dtype": model.opts.param_dtype,
        "options": options_to_dict(model.opts),
    }
    with _manager(ckpt_dir) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
    return ckpt_dir / str(step)


def _finalized_step(ckpt_dir: Path, step: int | None) -> int:
    if not ckpt_dir.is_dir():
        raise ConversionError(f"{ckpt_dir}: checkpoint directory not found")
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if step is None:
        if not steps:
            others = sorted(p.name for p in ckpt_dir.iterdir())
            raise ConversionError(f"{ckpt_dir}: no finalized checkpoint step (found {others}; unfinished saves are refused)")
        step = steps[-1]
    step_dir = ckpt_dir / str(step)
    if step not in steps:
        raise ConversionError(f"{step_dir}: no finalized checkpoint for step {step} (available: {steps})")
    if not is_committed(step_dir):
        raise ConversionError(f"{step_dir}: not a finalized Orbax checkpoint (no {COMMIT_MARKER} commit marker)")
    for item in ("params", "meta"):
        if not (step_dir / item).is_dir():
            raise ConversionError(f"{step_dir}: missing item {item!r} (not a lolcats_jax params checkpoint)")
    return step


def read_metadata(ckpt_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint step (default: the latest finalized one)."""
    ckpt_dir = Path(ckpt_dir)
    step = _finalized_step(ckpt_dir, step)
    path = ckpt_dir / str(step) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise ConversionError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def restore_targets(abstract_state: nnx.State, mesh: jax.sharding.Mesh) -> dict:
    """Pure-dict restore targets: ShapeDtypeStructs carrying NamedShardings on the concrete `mesh`."""
    shardings = shd.param_shardings(abstract_state, mesh)

    def target(var, sh: NamedSharding):
        value = var.get_value()
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, sh.spec))

    tree = jax.tree.map(target, abstract_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def load_checkpoint(ckpt_dir: str | Path, mesh: jax.sharding.Mesh | None = None, *, step: int | None = None) -> Llama:
    """The model saved in `ckpt_dir` (default: latest step), its parameters sharded over `mesh`
    (default: the first device alone)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_metadata(ckpt_dir, step)
    step = _finalized_step(ckpt_dir, step)
    where = str(ckpt_dir / str(step) / "meta")
    try:
        cfg = LlamaConfig.from_hf_dict(meta["config"], source=where)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    opts = options_from_dict(meta["options"], where)
    if mesh is None:
        mesh = shd.make_mesh(shd.MeshShape(1, 1, 1), devices=jax.devices()[:1])
    abstract = nnx.eval_shape(lambda: Llama(cfg, opts, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    targets = restore_targets(nnx.state(abstract, nnx.Param), mesh)
    with _manager(ckpt_dir) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(targets)))
    values = dict(_flatten(restored["params"]))
    flat = list(nnx.to_flat_state(abs_state))
    missing = [".".join(p) for p, _ in flat if p not in values]
    if missing:
        raise ConversionError(f"{ckpt_dir / str(step)}: checkpoint lacks parameter(s) {missing}")
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat]))


def _flatten(tree: Any, prefix: tuple[str, ...] = ()):
    """(path, leaf) pairs of a nested dict."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, (*prefix, str(k)))
    else:
        yield prefix, tree
