"""Opaque attention kernels (Pallas / Triton custom calls) run once per shard, under `shard_map`.

XLA cannot partition a custom call: left to the partitioner, every device would gather q, k, v and compute the
attention of the whole batch and all heads (8× the work on an fsdp-8 mesh, 32× on tensor 8 × fsdp 4). LoLCATS
attention is independent across batch rows and heads, so each device runs the kernel on its own rows (batch over
`data` + `fsdp`) and heads (`tensor`) — the logical axes "batch" and "act_heads" of the one rules table — with the
feature maps and window logits of those heads. A dimension the mesh does not divide stays whole (as everywhere in
`lolcats_jax.sharding`): still correct, only redundant along that mesh axis.

Notation: B batch, T tokens, H heads (k, v already repeated to H), D head dim, Dv value dim, F feature dim.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from kernels.lolcats import Backend, FeatureMapParams
from lolcats_jax import compat
from lolcats_jax.sharding import logical_to_spec

OPAQUE_BACKENDS = frozenset({Backend.PALLAS, Backend.TRITON})


def per_shard(fn: Callable, q_BTHD, k_BTHD, v_BTHD, fmap: FeatureMapParams, theta_H):
    """fn(q, k, v, fmap, theta) on each device's rows and heads of the current mesh (plain call off a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return fn(q_BTHD, k_BTHD, v_BTHD, fmap, theta_H)
    x = logical_to_spec(("batch", None, "act_heads", None), mesh, q_BTHD.shape)
    heads = x[2]
    w_HDF, s_H = P(heads, None, None), P(heads)
    fmap_specs = FeatureMapParams(w_HDF, w_HDF, None if fmap.bq is None else s_H, None if fmap.bk is None else s_H)
    theta_spec = None if theta_H is None else s_H
    sharded = compat.shard_map(fn, mesh=mesh, in_specs=(x, x, x, fmap_specs, theta_spec), out_specs=x)
    return sharded(q_BTHD, k_BTHD, v_BTHD, fmap, theta_H)


__all__ = ["OPAQUE_BACKENDS", "per_shard"]
