"""Logits parity of the Flax Llama against transformers' LlamaForCausalLM (PyTorch CPU, eager, fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lolcats_jax.model import Llama, LlamaConfig, ModelOptions, RopeScaling
from tests.hf_reference import rel_err, torch_model_like

CASES = [
    # (name, num_heads, num_kv_heads, tie, rope_scaling, seq_lens)
    ("gqa1_untied_llama3rope", 4, 4, False, RopeScaling(8.0, 1.0, 4.0, 32), (1, 7, 64)),
    ("gqa3_tied", 6, 2, True, None, (5, 33)),
    ("gqa4_untied", 8, 2, False, None, (17, 128)),
    ("gqa4_tied_llama3rope", 8, 2, True, RopeScaling(4.0, 1.0, 2.0, 16), (40,)),
]


@pytest.mark.parametrize("name,H,K,tie,scaling,lens", CASES, ids=[c[0] for c in CASES])
def test_tiny_random_parity(name, H, K, tie, scaling, lens):
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=112, num_layers=3, num_heads=H, num_kv_heads=K,
        head_dim=16, rope_theta=500000.0 if scaling else 10000.0, rope_scaling=scaling, tie_embeddings=tie,
        max_position_embeddings=256,
    )
    model = Llama(cfg, ModelOptions(param_dtype="float32", compute_dtype="float32"), rngs=nnx.Rngs(1))
    tm = torch_model_like(model)
    rng = np.random.RandomState(0)
    for T in lens:
        toks = rng.randint(0, cfg.vocab_size, size=(2, T))
        with torch.no_grad():
            ref = tm(torch.tensor(toks)).logits.numpy()
        out = np.asarray(model(jnp.asarray(toks)))
        err = rel_err(out, ref)
        print(f"{name} T={T}: max abs {np.abs(out - ref).max():.2e}, rel {err:.2e}")
        assert err < 1e-4, (name, T, err)


def test_remat_and_no_remat_agree():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    toks = jnp.asarray(np.random.RandomState(1).randint(0, 64, (1, 9)))
    a = Llama(cfg, ModelOptions(param_dtype="float32", remat=True), rngs=nnx.Rngs(3))(toks)
    b = Llama(cfg, ModelOptions(param_dtype="float32", remat=False), rngs=nnx.Rngs(3))(toks)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
