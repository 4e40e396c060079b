"""Jitted, sharded train and eval steps over a (trainable, frozen) split of the model.

The model is split once with an NNX filter (feature maps + window factors for attention transfer, LoRA adapters
for finetuning); only the trainable part has gradients and optimizer state. Steps are compiled once with explicit
in/out shardings and donate the trainable parameters and optimizer state. A train step takes a batch of shape
(A, B, T) — A micro-batches of gradient accumulation, scanned inside the step — and a PRNG key (raw uint32 (2,)) for
LoRA dropout: micro-batch i uses fold_in(key, i); evaluation never drops out.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lolcats_jax.distributed import AlignedJit
from lolcats_jax.errors import UserError
from lolcats_jax.model.llama import Llama
from lolcats_jax.sharding import param_shardings

LossFn = Callable[[Llama, dict, jax.Array | None], tuple[jax.Array, dict]]  # (model, batch, dropout key)


def path_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass
class Split:
    """The model as graphdef + trainable parameters (a flat {path: array} dict, what optax and Orbax see) + the
    frozen rest (an nnx.State)."""

    graphdef: Any
    template: list  # [(path, abstract Variable)] of the trainable parameters, carrying their `axes` metadata
    trainable: dict[str, jax.Array]
    frozen: nnx.State

    def state_of(self, flat: dict[str, jax.Array]) -> nnx.State:
        return nnx.from_flat_state([(p, var.replace(flat[path_key(p)])) for p, var in self.template])

    def merge(self, trainable: dict | None = None, frozen: nnx.State | None = None) -> Llama:
        t = self.trainable if trainable is None else trainable
        return nnx.merge(self.graphdef, self.state_of(t), self.frozen if frozen is None else frozen)

    def shardings(self, mesh) -> dict[str, NamedSharding]:
        state = nnx.from_flat_state(self.template)
        flat = nnx.to_flat_state(param_shardings(state, mesh))
        return {path_key(p): s for p, s in flat}


def split_model(model: Llama, trainable_filter) -> Split:
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
    flat = list(nnx.to_flat_state(trainable))
    if not flat:
        raise ValueError("nothing to train: the trainable filter selects no parameter")
    template = [(p, var.replace(jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype))) for p, var in flat]
    return Split(graphdef, template, {path_key(p): var.get_value() for p, var in flat}, frozen)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes a batch's sequences are split over (the "batch" rule)


def batch_axes(mesh: jax.sharding.Mesh, batch_size: int | None) -> tuple[str, ...]:
    """The mesh axes to split `batch_size` sequences over: ("data", "fsdp", "expert") when the batch divides them; in
    a single-process run it degrades to the largest sub-tuple that divides (e.g. the 8B recipe's batch of 1 on an
    8-GPU box: every device computes the sample, nothing fails). Several processes each feed their own rows, so
    there the batch must divide data × fsdp × expert."""
    if batch_size is None:
        return BATCH_AXES
    subsets = [c for r in range(len(BATCH_AXES), -1, -1) for c in itertools.combinations(BATCH_AXES, r)]
    candidates = [BATCH_AXES] if jax.process_count() > 1 else subsets
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)
    fits = [axes for axes in candidates if batch_size % size(axes) == 0]
    if fits:
        return max(fits, key=lambda axes: (size(axes), -len(axes)))  # most devices sharing the work, fewest axes
    raise UserError(f"a batch of {batch_size} sequences cannot be split over data × fsdp × expert = "
                    f"{' × '.join(str(mesh.shape[a]) for a in BATCH_AXES)} devices of {jax.process_count()} "
                    "processes: make the batch size a multiple of data × fsdp × expert")


def batch_sharding(mesh: jax.sharding.Mesh, accumulate: bool, batch_size: int | None = None) -> NamedSharding:
    """Sharding of a (B, T) batch, or (A, B, T) with `accumulate` (micro-batches along A, unsplit)."""
    axes = batch_axes(mesh, batch_size) or None
    spec = P(None, axes, None) if accumulate else P(axes, None)
    return NamedSharding(mesh, spec)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def build_steps(split: Split, tx: optax.GradientTransformation, loss_fn: LossFn, mesh: jax.sharding.Mesh):
    """Returns (init_opt_state, train_step, eval_step), all jitted with explicit shardings."""
    t_shard = split.shardings(mesh)
    f_shard = param_shardings(split.frozen, mesh)
    replicated = NamedSharding(mesh, P())

    def loss_of(trainable, frozen, batch, key):
        return loss_fn(split.merge(trainable, frozen), batch, key)

    def train_step(trainable, opt_state, frozen, batch_ABT, lr, key):
        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        A = jax.tree.leaves(batch_ABT)[0].shape[0]

        def micro(carry, inputs):
            mb, i = inputs
            (_, metrics), grads = grad_fn(trainable, frozen, mb, jax.random.fold_in(key, i))
            return _tree_add(carry, (grads, metrics)), None

        if A == 1:
            (_, m0), g0 = grad_fn(trainable, frozen, jax.tree.map(lambda x: x[0], batch_ABT), jax.random.fold_in(key, 0))
        else:  # one trace of forward+backward, inside the scan (the zero start adds exactly nothing)
            first = jax.tree.map(lambda x: x[0], batch_ABT)
            m_shape = jax.eval_shape(lambda: grad_fn(trainable, frozen, first, key)[0][1])
            zeros = (jax.tree.map(jnp.zeros_like, trainable), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), m_shape))
            (g0, m0), _ = jax.lax.scan(micro, zeros, (batch_ABT, jnp.arange(A)))
            g0 = jax.tree.map(lambda g: g / A, g0)
            m0 = jax.tree.map(lambda m: m / A, m0)
        opt_state.hyperparams["learning_rate"] = lr
        updates, opt_state = tx.update(g0, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        m0 = dict(m0, grad_norm=optax.tree.norm(g0), lr=lr)
        return trainable, opt_state, m0

    def eval_step(trainable, frozen, batch_BT):
        _, metrics = loss_of(trainable, frozen, batch_BT, None)
        return metrics

    abstract_opt = jax.eval_shape(tx.init, split.trainable)
    o_shard = _opt_shardings(abstract_opt, t_shard, replicated)
    # AlignedJit: with several processes each new compilation first runs on all of them together (distributed.py)
    init_opt = AlignedJit(jax.jit(tx.init, in_shardings=(t_shard,), out_shardings=o_shard), "init_opt")
    train = AlignedJit(jax.jit(
        train_step,
        in_shardings=(t_shard, o_shard, f_shard, None, replicated, replicated),  # the batch's own (batch_sharding)
        out_shardings=(t_shard, o_shard, replicated),
        donate_argnums=(0, 1),
    ), "train_step")
    evaluate = AlignedJit(jax.jit(eval_step, in_shardings=(t_shard, f_shard, None), out_shardings=replicated),
                          "eval_step")
    return init_opt, train, evaluate, (t_shard, o_shard, f_shard)


def _opt_shardings(abstract_opt, t_shard, replicated):
    """Adam moments are sharded like the parameters they follow; scalars (counts, hyperparams) replicated."""
    return _map_subtrees(abstract_opt, jax.tree.structure(t_shard), t_shard, replicated)


def _map_subtrees(tree, t_struct, t_shard, replicated):
    # optax states are (named)tuples/dicts; a subtree with the parameters' structure gets their shardings
    if jax.tree.structure(tree) == t_struct:
        return t_shard
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*[_map_subtrees(x, t_struct, t_shard, replicated) for x in tree])
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_subtrees(x, t_struct, t_shard, replicated) for x in tree)
    if isinstance(tree, dict):
        return {k: _map_subtrees(v, t_struct, t_shard, replicated) for k, v in tree.items()}
    return jax.tree.map(lambda _: replicated, tree)
