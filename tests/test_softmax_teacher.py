"""The softmax teacher in causal query blocks equals a float64 numpy softmax (values) and a plain masked softmax
(gradients), grouped heads, partial blocks; at long T no (T, T) map exists: blocks are rematerialised and the compiled
distill step at T = 4096 holds no (T, T) buffer."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lolcats_jax.model import softmax_attention as sa


def _inputs(B=2, T=700, H=6, K=2, D=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, K, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, K, D)), jnp.float32)
    return q, k, v


def _numpy_teacher(q, k, v):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", p, v)


def _plain_teacher(q, k, v):
    """A masked (T, T) softmax written out in jnp (differentiable; the independent formula the gradients are
    checked against)."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D)
    p = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf), axis=-1)
    return jnp.einsum("bhij,bjhd->bihd", p, v)


def _check_against_references(fn, q, k, v):
    np.testing.assert_allclose(np.asarray(fn(q, k, v)), _numpy_teacher(q, k, v), rtol=1e-4, atol=1e-5)

    def loss(f, q, k, v):
        return jnp.sum(jnp.sin(f(q, k, v)))

    g = jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(functools.partial(loss, _plain_teacher), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_rematerialised_query_blocks_equal_the_plain_softmax():
    """An explicit query block (rematerialised blocks; 700 = 5 blocks of 128 + a partial one), grouped heads."""
    q, k, v = _inputs()
    _check_against_references(functools.partial(sa.causal_softmax_attention, query_block=128), q, k, v)


def test_causal_blocks_at_training_lengths_equal_numpy():
    """T ≤ DENSE_MAX_T (the distill teacher): causal query blocks of 128 (the last one partial at T = 300) with
    unnormalised weights equal a float64 numpy softmax; gradients equal a plain masked softmax's."""
    q, k, v = _inputs(B=2, T=300, H=6, K=2, D=16, seed=1)
    _check_against_references(sa.causal_softmax_attention, q, k, v)


def test_long_block_sizes():
    assert sa.long_block(1025) == sa.CAUSAL_BLOCK
    assert sa.long_block(4096) == 128 and sa.long_block(4097) == 256 and sa.long_block(8192) == 256
    assert sa.long_block(32768) == 1024 and -(-32768 // sa.long_block(32768)) <= sa.MAX_BLOCKS


def test_long_sequences_take_rematerialised_causal_blocks():
    """T > DENSE_MAX_T: no (T, T) map, blocks against only the keys up to their last query, and the backward pass
    recomputes each block (a remat region per block)."""
    q, k, v = _inputs(B=1, T=sa.DENSE_MAX_T + 3, H=2, K=1, D=8)
    T = q.shape[1]
    text = jax.jit(sa.causal_softmax_attention).lower(q, k, v).as_text()
    assert f"{T}x{T}" not in text
    blk = sa.long_block(T)
    assert f"1x1x2x{blk}x{blk}xf32" in text and f"1x1x2x{T - blk * (T // blk)}x{T}xf32" in text
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(sa.causal_softmax_attention(q, k, v))))(q))
    assert jaxpr.count("remat") + jaxpr.count("checkpoint") >= -(-T // blk)


def test_compiled_distill_step_at_4096_has_no_TxT_buffer(smollm2_dir, tmp_path):
    from flax import nnx

    from convert.hf_to_flax import load_hf_params
    from lolcats_jax import compat
    from lolcats_jax.config import OptimizerConfig, load_config
    from lolcats_jax.model import FeatureMapParam, LlamaConfig, WindowParam
    from lolcats_jax.model.build import model_options
    from lolcats_jax.sharding import MeshShape, make_mesh
    from lolcats_jax.train.losses import distill_loss
    from lolcats_jax.train.optim import make_optimizer
    from lolcats_jax.train.step import build_steps, split_model
    from tests.train_fixtures import write_tiny_model

    T = 4096
    model_dir = write_tiny_model(tmp_path / "model", smollm2_dir)
    cfg = load_config("configs/smollm2_demo.yaml", [f"model.path={model_dir}", "model.param_dtype=float32",
                                                    "attention.softmax_layers=[1]", "attention.backend=chunked"])
    mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    with compat.set_mesh(mesh):
        lc = LlamaConfig.from_hf_dir(model_dir)
        model = load_hf_params(model_dir, mesh, param_dtype="float32", opts=model_options(cfg, lc.num_layers))
        split = split_model(model, nnx.Any(FeatureMapParam, WindowParam))
        tx = make_optimizer(OptimizerConfig(lr=1e-2))
        loss_fn = functools.partial(distill_loss, mse_factor=1000.0, xent_factor=0.0)
        init_opt, train, _, _ = build_steps(split, tx, loss_fn, mesh)
        tokens = jnp.zeros((1, 1, T), jnp.int32)
        compiled = train.lower(split.trainable, init_opt(split.trainable), split.frozen,
                               {"input_ids": tokens, "labels": tokens}, jnp.float32(1e-2), jax.random.PRNGKey(0)).compile()
    hlo = compiled.as_text()
    square = re.findall(r"\b[a-z0-9]+\[[0-9,]*\b%d,%d\b[0-9,]*\]" % (T, T), hlo)
    assert not square, square[:5]
    assert re.search(r"\[1,2,2,%d,%d\]" % (sa.long_block(T), T), hlo)  # the last block's (block, T) scores
