"""The MoE under another jax (the GPU machines run jax 0.11.2): grouped dispatch vs its dense definition, and a
random tiny Mixtral's LoRA loss + gradients (expert adapters included) on one device vs fsdp 2 × tensor 2 × expert 2
(8 fake CPU devices). Needs only jax, flax, numpy, pyyaml — no transformers, torch or orbax:

    PYENV_VERSION=3.12.1 python3 -m venv /tmp/py312 && /tmp/py312/bin/pip install jax==0.11.2 flax numpy pyyaml optax
    /tmp/py312/bin/python benchmarks/moe_other_jax.py
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lolcats_jax import compat  # noqa: E402
from lolcats_jax.model import Llama, LlamaConfig, ModelOptions, LoraOptions  # noqa: E402
from lolcats_jax.model.llama import LoraParam  # noqa: E402
from lolcats_jax.sharding import MeshShape, make_mesh, param_shardings  # noqa: E402
from moe_check import correctness  # noqa: E402
print("jax", jax.__version__)
assert all(r["pass"] for r in correctness(smoke=True))
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, model_type="mixtral", num_experts=4, num_experts_per_tok=2)
opts = ModelOptions(param_dtype="float32", compute_dtype="float32", layer_kinds=("softmax", "softmax"),
                    lora=LoraOptions(rank=4, targets=("q", "v", "gate", "up", "down")))
model = Llama(cfg, opts, rngs=nnx.Rngs(0))
state = nnx.state(model)
rng = np.random.default_rng(0)
state = jax.tree.map(lambda v: jnp.asarray(rng.normal(0, 0.05, v.shape), v.dtype) if v.ndim >= 2 else v, state)
graphdef = nnx.graphdef(model)
tokens = jnp.asarray(rng.integers(0, 128, (8, 24)), jnp.int32)

def loss(lora, rest):
    m = nnx.merge(graphdef, lora, rest)
    logits = m(tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


model = nnx.merge(graphdef, state)
lora, rest = nnx.state(model, LoraParam, ...)
out = []
for mesh in (make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1]), make_mesh(MeshShape(1, 2, 2, 2))):
    with compat.set_mesh(mesh):
        lora_s, rest_s = (jax.device_put(x, param_shardings(x, mesh)) for x in (lora, rest))
        l, g = jax.jit(jax.value_and_grad(loss))(lora_s, rest_s)
        out.append((float(l), jax.tree.map(np.asarray, g)))
print("loss", out[0][0], out[1][0])
worst = 0.0
for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    worst = max(worst, float(np.linalg.norm(a - b) / np.linalg.norm(a)))
print("worst gradient rel diff", worst)
assert abs(out[0][0] - out[1][0]) < 1e-5 * abs(out[0][0]) and worst < 1e-5
print("OK")
