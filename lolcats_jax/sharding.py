"""Logical axis names → mesh axes, in one table.

Every parameter carries a tuple of logical axis names in its `axes` metadata (one per dimension), and the main
activations are constrained with logical names too. `LOGICAL_RULES` is the only place where those names meet the
mesh axes `data`, `fsdp`, `tensor` and `expert`:

    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters / optimizer state sharded along their embed dimension (ZeRO-3 style)
    tensor  Megatron-style tensor parallelism over heads and the MLP hidden dimension
    expert  expert parallelism: the experts of a mixture-of-experts MLP are split over it; everywhere else it is
            one more data axis (batch rows), so attention is never computed twice (`lolcats_jax.model.moe`)

A dimension whose size is not divisible by the mesh axes its rule names is left unsharded (SmolLM2's 3 KV heads
on a tensor axis of 2, say): correctness never depends on the rules, only memory and speed do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lolcats_jax import compat

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def parse_mesh_shape(text: str) -> "MeshShape":
    """"data=1,fsdp=-1,tensor=1[,expert=1]" → MeshShape (omitted axes keep their defaults); ValueError naming the bad part."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in MESH_AXES:
            raise ValueError(f"cannot parse {part!r}; expected NAME=SIZE with NAME in {MESH_AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"size of {name!r} must be an integer, got {value!r}") from None
    return MeshShape(**sizes)

# logical name → mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: Mapping[str, Any] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "norm": None,
    "feature": None,
    "lora_rank": None,
}


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor, self.expert]
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"mesh: at most one axis may be -1 (the rest), got {dict(zip(MESH_AXES, sizes))}")
        fixed = int(np.prod([s for s in sizes if s != -1]))
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes product {fixed}")
            sizes[sizes.index(-1)] = num_devices // fixed
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(
                f"mesh: {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but {num_devices} are available"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(shape: MeshShape | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor, expert) mesh over `devices` (default: all devices of all processes)."""
    if shape is None:
        shape = MeshShape()
    elif isinstance(shape, Mapping):
        shape = MeshShape(**shape)
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = shape.resolve(len(devices))
    return compat.make_mesh(sizes, MESH_AXES, devices=devices)


def _mesh_axis_size(mesh: jax.sharding.Mesh, axis: Any) -> int:
    if axis is None:
        return 1
    if isinstance(axis, tuple):
        return int(np.prod([mesh.shape[a] for a in axis]))
    return int(mesh.shape[axis])


def logical_to_spec(
    axes: Sequence[str | None], mesh: jax.sharding.Mesh, shape: Sequence[int] | None = None, rules: Mapping[str, Any] = LOGICAL_RULES
) -> P:
    """PartitionSpec for a tensor with logical `axes`. With `shape`, dims that do not divide evenly stay unsharded,
    and a mesh axis is used by at most one dimension."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        mesh_axis = rules[name]
        if mesh_axis is not None:
            names = mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,)
            names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
            if shape is not None:
                # drop trailing mesh axes until the dimension divides evenly
                while names and shape[i] % _mesh_axis_size(mesh, names):
                    names = names[:-1]
            mesh_axis = None if not names else (names[0] if len(names) == 1 else names)
            used.update(names)
        out.append(mesh_axis)
    return P(*out)


def named_sharding(axes: Sequence[str | None], mesh: jax.sharding.Mesh, shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names, a no-op outside a mesh context (or on a 1-device mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(axes, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def param_shardings(abstract_state, mesh: jax.sharding.Mesh):
    """NamedSharding for every leaf of an abstract nnx State (Variables carrying `axes` metadata)."""
    from flax import nnx

    def one(var):
        axes = var.get_metadata().get("axes")
        shape = var.get_value().shape if hasattr(var, "get_value") else var[...].shape
        if axes is None:
            axes = (None,) * len(shape)
        if len(axes) != len(shape):
            raise ValueError(f"axes {axes} do not match shape {shape}")
        return named_sharding(axes, mesh, shape)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
