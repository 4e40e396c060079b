"""The Hugging Face tokenizer of a model directory, loaded offline, plus prompt rendering."""

from __future__ import annotations

import os
from pathlib import Path


def load_tokenizer(model_dir: str | os.PathLike):
    """`AutoTokenizer` of a local directory (never contacts a hub)."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json / tokenizer_config.json (expected a Hugging Face model directory)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of `text`, rendered with the tokenizer's chat template (as one user turn) when `chat`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def eos_ids(tokenizer, model_eos=None) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model_eos is not None:
        ids.update([model_eos] if isinstance(model_eos, int) else list(model_eos))
    return sorted(ids)
