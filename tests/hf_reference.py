"""Independent bridge to transformers for parity tests: copies a JAX Llama's weights into a PyTorch
`LlamaForCausalLM` (eager attention, fp32) written directly from the documented HF layout."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import transformers

from lolcats_jax.model import Llama


def torch_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    E = cfg.hidden_size
    t = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))
    P = model.layers
    sd = {"model.embed_tokens.weight": t(model.embed[...]), "model.norm.weight": t(model.final_norm[...])}
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = t(P.attn_norm[...][i])
        sd[pre + "post_attention_layernorm.weight"] = t(P.mlp_norm[...][i])
        sd[pre + "self_attn.q_proj.weight"] = t(np.asarray(P.wq[...][i], np.float32).reshape(E, -1).T)
        sd[pre + "self_attn.k_proj.weight"] = t(np.asarray(P.wk[...][i], np.float32).reshape(E, -1).T)
        sd[pre + "self_attn.v_proj.weight"] = t(np.asarray(P.wv[...][i], np.float32).reshape(E, -1).T)
        sd[pre + "self_attn.o_proj.weight"] = t(np.asarray(P.wo[...][i], np.float32).reshape(-1, E).T)
        sd[pre + "mlp.gate_proj.weight"] = t(np.asarray(P.w_gate[...][i], np.float32).T)
        sd[pre + "mlp.up_proj.weight"] = t(np.asarray(P.w_up[...][i], np.float32).T)
        sd[pre + "mlp.down_proj.weight"] = t(np.asarray(P.w_down[...][i], np.float32).T)
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = t(np.asarray(model.lm_head[...], np.float32).T)
    return sd


def torch_model_like(model: Llama) -> transformers.LlamaForCausalLM:
    hf_cfg = transformers.LlamaConfig(**model.cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    tm = transformers.LlamaForCausalLM(hf_cfg).eval().float()
    result = tm.load_state_dict(torch_state_dict(model), strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    assert not unexpected and not missing, (missing, unexpected)
    if model.cfg.tie_embeddings:
        tm.tie_weights()
    return tm


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch on n threads (tiny reference models are much faster on one thread of a busy 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
