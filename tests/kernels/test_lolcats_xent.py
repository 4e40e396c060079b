"""Blockwise attention cross-entropy against the full-map reference and the naive float64 maps."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from lolcats_testutil import cast_tree, make_inputs, naive_attention, naive_teacher_weights, rel_rms

from kernels.lolcats import LolcatsSpec
from kernels.lolcats.xent import attention_xent, attention_xent_reference
from lolcats_jax.compat import enable_x64

SPECS = [
    dict(window="tk", window_size=4),
    dict(window="sw", window_size=3, feature_map="exp_dim", affine=True),
    dict(window="tk", window_size=4, compat=True),
    dict(form="linear", feature_map="relu"),
    dict(form="softmax"),
]


def _xent_and_grads(fn, inputs, spec):
    q, k, v, fmap, theta = inputs
    argnums = (0, 1, 2, 3) if spec.form == "hybrid" else (0, 1, 2)
    return jax.jit(jax.value_and_grad(lambda q, k, fm, th: fn(q, k, fm, th, spec), argnums=argnums))(q, k, fmap, theta)


@pytest.mark.parametrize("kw", SPECS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_blockwise_xent_matches_full_map_reference(kw):
    spec = LolcatsSpec(**kw)
    inputs = make_inputs(0, 2, 13, 2, 8, 4, bias=spec.feature_map == "relu")
    blockwise = lambda q, k, fm, th, spec: attention_xent(q, k, None, fm, th, spec, query_chunk=5)  # noqa: E731
    val, grads = _xent_and_grads(blockwise, inputs, spec)
    val_ref, grads_ref = _xent_and_grads(attention_xent_reference, inputs, spec)
    assert val.shape == () and abs(float(val) - float(val_ref)) <= 1e-5 * abs(float(val_ref))
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert rel_rms(g, g_ref) < 1e-4


@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["H2K2", "H4K1"])
@pytest.mark.parametrize("kw", SPECS[:4], ids=lambda kw: "-".join(map(str, kw.values())))
def test_xent_matches_naive_float64(kw, heads):
    spec = LolcatsSpec(**kw)
    H, K = heads
    with enable_x64():
        q, k, v, fmap, theta = cast_tree(make_inputs(1, 1, 11, H, 6, 3, K=K), jnp.float64)
        got = float(jax.jit(lambda *a: attention_xent(*a, spec, query_chunk=4))(q, k, v, fmap, theta))
    _, student = naive_attention(q, k, v, fmap, theta, spec, return_weights=True)
    teacher = naive_teacher_weights(q, k)
    want = np.mean(-np.sum(teacher * np.log(np.maximum(student, 1e-12)), axis=-1))
    assert abs(got - want) < 1e-12 * abs(want)


def test_xent_never_builds_a_full_map():
    """No array in the value-and-grad program has two axes of length T (T is odd and unlike every other dim)."""
    T, spec = 37, LolcatsSpec(window="tk", window_size=4)
    q, k, v, fmap, theta = make_inputs(0, 1, T, 2, 8, 4)
    fn = jax.value_and_grad(lambda q, k, fm, th: attention_xent(q, k, None, fm, th, spec, query_chunk=8),
                            argnums=(0, 1, 2, 3))
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.extend(tuple(getattr(x.aval, "shape", ())) for x in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(q, k, fmap, theta).jaxpr)
    assert any(s.count(T) == 1 and 8 in s for s in shapes)  # the (…, Cq, T) blocks exist
    assert not [s for s in shapes if s.count(T) >= 2]
    with pytest.raises(ValueError, match="query_chunk=0"):
        attention_xent(q, k, None, fmap, theta, spec, query_chunk=0)
