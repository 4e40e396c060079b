"""The same forward on fake 8-device CPU meshes equals the single-device result; parameters are sharded as the
logical-axis rules say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lolcats_jax import compat
from lolcats_jax.model import Llama, LlamaConfig, ModelOptions
from lolcats_jax.model.build import init_sharded
from lolcats_jax.sharding import MeshShape, logical_to_spec, make_mesh

CFG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8)
OPTS = ModelOptions(param_dtype="float32", compute_dtype="float32")


def _forward(model, toks):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, toks)


@pytest.fixture(scope="module")
def single():
    mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    with compat.set_mesh(mesh):
        model = init_sharded(CFG, OPTS, mesh, seed=7)
    toks = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 24)))
    return np.asarray(_forward(model, toks)), toks


@pytest.mark.parametrize("shape", [MeshShape(data=1, fsdp=4, tensor=2), MeshShape(data=2, fsdp=4, tensor=1)], ids=["fsdp4_tp2", "dp2_fsdp4"])
def test_sharded_forward_equals_single_device(single, shape):
    assert jax.device_count() == 8
    ref, toks = single
    mesh = make_mesh(shape)
    with compat.set_mesh(mesh):
        model = init_sharded(CFG, OPTS, mesh, seed=7)
        toks_sharded = jax.device_put(toks, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
        out = _forward(model, toks_sharded)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)
    # parameters are sharded exactly as the rules say
    wq = model.layers.wq[...]
    assert wq.sharding.spec == logical_to_spec(("layers", "embed", "q_heads", "head_dim"), mesh, wq.shape)
    expected_wq = P(None, "fsdp", "tensor") if shape.tensor == 2 else P(None, "fsdp")
    assert tuple(wq.sharding.spec) == tuple(expected_wq) + (None,) * (4 - len(expected_wq))
    n_shards = len({tuple((s.start, s.stop) for s in idx) for idx in wq.sharding.devices_indices_map(wq.shape).values()})
    assert n_shards == shape.fsdp * shape.tensor
    emb = model.embed[...]
    assert tuple(emb.sharding.spec) == (("tensor" if shape.tensor == 2 else None), "fsdp")


def test_indivisible_dims_stay_replicated():
    mesh = make_mesh(MeshShape(data=1, fsdp=4, tensor=2))
    # 3 kv heads cannot be split over tensor=2 → replicated on that dim; embed 576 splits over fsdp=4
    spec = logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), mesh, (30, 576, 3, 64))
    assert tuple(spec) == (None, "fsdp", None, None)


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="needs 6 devices"):
        MeshShape(data=2, fsdp=3, tensor=1).resolve(8)
    with pytest.raises(ValueError, match="at most one axis"):
        MeshShape(data=-1, fsdp=-1).resolve(8)
    assert MeshShape(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2, 1)
    assert MeshShape(data=1, fsdp=-1, tensor=2, expert=2).resolve(8) == (1, 2, 2, 2)
