"""Opaque attention kernels run per shard: the sharded distill and LoRA steps of a tiny linearized model, lowered for
CUDA on 8-device meshes without a GPU, call every Triton kernel on per-device operands (the device's batch rows and
heads), inside shard_map; on CPU (Pallas interpret mode) the sharded step equals the one-device step."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.lolcats import Backend, register_backend
from kernels.lolcats import pallas_hybrid
from lolcats_jax import compat
from lolcats_jax.config import OptimizerConfig, load_config
from lolcats_jax.model import FeatureMapParam, LlamaConfig, LoraParam, WindowParam
from lolcats_jax.sharding import MeshShape, make_mesh
from lolcats_jax.train.losses import distill_loss, lm_loss
from lolcats_jax.train.optim import make_optimizer
from lolcats_jax.model.build import model_options
from lolcats_jax.train.step import build_steps, split_model
from tests.train_fixtures import write_tiny_model

TRITON_CALL = "__gpu$xla.gpu.triton"
B, T, H, K = 8, 64, 4, 2  # tiny model: 4 query heads over 2 kv heads, dim 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", smollm2_dir)


def _steps(tiny_dir, mesh, kind):
    from convert.hf_to_flax import load_hf_params

    cfg = load_config("configs/smollm2_demo.yaml", [
        f"model.path={tiny_dir}", "model.param_dtype=float32", "model.compute_dtype=bfloat16",
        "attention.window_size=16", "attention.feature_dim=16", "attention.chunk_size=16", "attention.backend=pallas"])
    lc = LlamaConfig.from_hf_dir(cfg.model.path)
    lora = cfg.finetune.lora if kind == "lora" else None
    model = load_hf_params(cfg.model.path, mesh, param_dtype="float32", opts=model_options(cfg, lc.num_layers, lora=lora),
                           seed=3)
    if kind == "distill":
        split = split_model(model, nnx.Any(FeatureMapParam, WindowParam))
        loss_fn = functools.partial(distill_loss, mse_factor=1000.0, xent_factor=0.0)
    else:
        split = split_model(model, LoraParam)
        loss_fn = lm_loss
    tx = make_optimizer(OptimizerConfig(lr=1e-2))
    init_opt, train, _, _ = build_steps(split, tx, loss_fn, mesh)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 40000, (1, B, T)).astype(np.int32))
    args = (split.trainable, init_opt(split.trainable), split.frozen, {"input_ids": tokens, "labels": tokens},
            jnp.float32(1e-2), jax.random.PRNGKey(0))
    return train, args


@pytest.fixture
def compiled_pallas():
    """Backend.PALLAS in compiled (Triton) mode, as on a GPU, for lowering on this CPU machine."""
    compiled = functools.partial(pallas_hybrid.pallas_lolcats_attention, config=pallas_hybrid.PallasConfig(interpret=False))
    register_backend(Backend.PALLAS, lambda *a: compiled(*a), unsupported=pallas_hybrid.unsupported_reason)
    yield
    from kernels.lolcats.pallas import lolcats_attention_pallas

    register_backend(Backend.PALLAS, lolcats_attention_pallas, unsupported=pallas_hybrid.unsupported_reason)


def _kernel_activation_shapes(text: str) -> set[tuple[int, ...]]:
    """Shapes of the 4-D bf16 operands/results (q, k, v, y, dy: [B, T, H, D]) of every Triton custom call."""
    shapes = set()
    for line in text.splitlines():
        if TRITON_CALL in line:
            for dims in re.findall(r"tensor<(\d+)x(\d+)x(\d+)x(\d+)xbf16>", line):
                shapes.add(tuple(int(d) for d in dims))
    return shapes


# (mesh, the per-device kv heads): the kernels take the device's K/|tensor| raw kv heads beside its H/|tensor| query
# heads — never K/V repeated to the query heads — except on tensor 4, which divides H = 4 but not K = 2: there k, v
# are repeated to H before the split (kernel_shards' one fallback)
MESHES = [(MeshShape(1, 8, 1), K), (MeshShape(1, 4, 2), K // 2), (MeshShape(1, 2, 4), H // 4)]


@pytest.mark.parametrize("kind", ["distill", "lora"])
@pytest.mark.parametrize("mesh_shape,kv_local", MESHES, ids=["fsdp8", "fsdp4_tensor2", "fsdp2_tensor4"])
def test_triton_calls_take_per_device_operands(tiny_dir, compiled_pallas, kind, mesh_shape, kv_local):
    mesh = make_mesh(mesh_shape)
    rows = B // (mesh_shape.data * mesh_shape.fsdp)
    local = {(rows, T, H // mesh_shape.tensor, 16), (rows, T, kv_local, 16)}  # q, y, dy and k, v, dk, dv
    with compat.set_mesh(mesh):
        train, args = _steps(tiny_dir, mesh, kind)
        with compat.cuda_lowering_context():
            text = train.trace(*compat.abstract_for_cuda(args)).lower(lowering_platforms=("cuda",)).as_text()
    calls = text.count(TRITON_CALL)
    assert calls == 5, calls  # one scanned segment of linearized layers: 2 forward + 3 backward kernels
    assert _kernel_activation_shapes(text) == local, (_kernel_activation_shapes(text), local)
    assert "manual_computation" in text or "SPMDFullToShardShape" in text  # inside shard_map


def test_sharded_pallas_step_equals_one_device(tiny_dir):
    """Interpret mode on CPU: the per-shard kernels on a tensor 4 × fsdp 2 mesh give the one-device step."""
    losses = []
    for mesh in (make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1]), make_mesh(MeshShape(1, 2, 4))):
        with compat.set_mesh(mesh):
            train, args = _steps(tiny_dir, mesh, "distill")
            _, _, metrics = train(*args)
            losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-3)  # bf16 compute
