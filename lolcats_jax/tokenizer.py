"""The Hugging Face tokenizer of a model directory, loaded offline, plus prompt rendering."""

from __future__ import annotations

import json
import os
from pathlib import Path


# tokenizer classes that are the plain `tokenizers` backend: loaded directly, what AutoTokenizer would build
_PLAIN_FAST = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer of a local Hugging Face directory (never contacts a hub): `AutoTokenizer`, except that a
    directory whose `tokenizer_config.json` names the plain fast tokenizer (Llama 3.x, the SmolLM2 build) is
    loaded by that class directly — the same object, without AutoTokenizer's torch import (~7 s on 2 cores)."""
    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json / tokenizer_config.json (expected a Hugging Face model directory)")
    if (path / "tokenizer.json").is_file() and _tokenizer_class(path) in _PLAIN_FAST:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _tokenizer_class(path: Path) -> str | None:
    try:
        return json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of `text`, rendered with the tokenizer's chat template (as one user turn) when `chat`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


def eos_ids(tokenizer, model_eos=None) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model_eos is not None:
        ids.update([model_eos] if isinstance(model_eos, int) else list(model_eos))
    return sorted(ids)
