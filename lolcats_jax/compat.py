"""Every difference between the JAX/Flax versions this project runs on, in one place.

CPU machines (Python 3.11): jax/jaxlib 0.10.2, flax 0.12.8.
GPU machines (Python 3.12): jax 0.11.2 (+ CUDA plugin) and the image's flax.

Nothing outside this module branches on a version number.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import jax
import numpy as np

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


# --------------------------------------------------------------------------------------------- meshes


def make_mesh(shape: Sequence[int], names: Sequence[str], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A mesh whose axes are all *Auto* (jax.make_mesh defaults to Explicit axes, which reject the
    FSDP-style matmuls with sharded contracting dimensions this project relies on)."""
    shape, names = tuple(int(s) for s in shape), tuple(names)
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    if devices is None:
        return jax.make_mesh(shape, names, axis_types=axis_types)
    arr = np.asarray(devices, dtype=object).reshape(shape)
    return jax.sharding.Mesh(arr, names, axis_types=axis_types)


def set_mesh(mesh: jax.sharding.Mesh):
    """Context manager that makes `mesh` the current mesh (jax.set_mesh on both versions)."""
    return jax.set_mesh(mesh)


def shard_map(f, *, mesh, in_specs, out_specs, check_vma: bool = False):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)


# --------------------------------------------------------------------------------------------- Pallas


def triton_compiler_params(num_warps: int = 4, num_stages: int = 2):
    """Explicit Triton compiler params. Passing them selects the Triton lowering on both 0.10 (whose default GPU
    backend is Mosaic GPU) and 0.11 (default Triton)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@contextlib.contextmanager
def cuda_lowering_context(device_kind: str = "NVIDIA H200", num_cores: int = 132):
    """Context in which `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` works on a machine without a
    GPU. jax >= 0.11 needs an abstract mesh carrying a CUDA abstract device: the current mesh's axes (fake CPU
    devices standing in for GPUs; its size cannot change inside) on that device, or a 1-device mesh off a mesh;
    0.10 needs nothing."""
    if JAX_VERSION >= (0, 11, 0):
        from jax.sharding import AbstractDevice, AbstractMesh  # type: ignore[attr-defined]

        device = AbstractDevice(device_kind, num_cores, "cuda")
        current = jax.sharding.get_abstract_mesh()
        if current is not None and not current.empty:
            mesh = AbstractMesh(current.axis_sizes, current.axis_names, current.axis_types, abstract_device=device)
        else:
            mesh = AbstractMesh((1,), ("x",), abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            yield
    else:
        yield


def abstract_for_cuda(tree):
    """Inside `cuda_lowering_context`: the arrays of `tree` as shape/dtype/sharding structs on the context's CUDA
    abstract mesh (same partition specs), so that a program sharded over fake CPU devices lowers for CUDA — jax >= 0.11
    refuses inputs placed on the CPU mesh beside the CUDA one. Unchanged on 0.10 (and for unsharded leaves)."""
    if JAX_VERSION < (0, 11, 0):
        return tree
    mesh = jax.sharding.get_abstract_mesh()

    def one(x):
        sharding = getattr(x, "sharding", None)
        if not isinstance(x, jax.Array) or not isinstance(sharding, jax.sharding.NamedSharding):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, sharding.spec))

    return jax.tree.map(one, tree)


def lower_for_cuda(fn, *args, **kwargs) -> str:
    """Lower `fn(*args, **kwargs)` for CUDA without a GPU and return the StableHLO text."""
    with cuda_lowering_context():
        traced = jax.jit(fn).trace(*args, **kwargs)
        lowered = traced.lower(lowering_platforms=("cuda",))
    return lowered.as_text()


# --------------------------------------------------------------------------------------------- Flax NNX


@functools.lru_cache(maxsize=None)
def nnx():
    """flax.nnx, imported lazily (flax 0.12.8's nnx does not import on jax 0.11.2; the GPU image brings its own)."""
    from flax import nnx as _nnx

    return _nnx


def variable_value(var) -> Any:
    """The array held by an nnx.Variable (`.value` is deprecated in favour of `var[...]`)."""
    return var.get_value() if hasattr(var, "get_value") else var[...]


def variable_metadata(var) -> dict:
    return dict(var.get_metadata())


def gpu_available() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


# --------------------------------------------------------------------------------------------- precision


def enable_x64(enabled: bool = True):
    """Context manager turning 64-bit types on (float64 ground-truth computations in tests)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(enabled)
    from jax.experimental import enable_x64 as _enable_x64  # older jax

    return _enable_x64(enabled)
