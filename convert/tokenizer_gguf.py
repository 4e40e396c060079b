"""Build a Hugging Face fast tokenizer from the tokenizer metadata of a GGUF file.

A GGUF carries no ``tokenizer.json``; llama.cpp keeps the tokenizer as metadata fields:

* ``tokenizer.ggml.model``      -- the algorithm; only ``gpt2`` (byte-level BPE) is handled here,
* ``tokenizer.ggml.pre``        -- llama.cpp's name for the pre-tokenizer (how text is split before BPE),
* ``tokenizer.ggml.tokens``     -- the vocabulary, in id order, spelled in the GPT-2 byte alphabet,
* ``tokenizer.ggml.merges``     -- the BPE merges, best first, as ``"left right"`` strings,
* ``tokenizer.ggml.token_type`` -- per token: 1 normal, 3 control (special), 4 user-defined, ...,
* the special token ids, ``add_bos_token``/``add_eos_token`` and ``tokenizer.chat_template``.

The tokenizer is rebuilt with the ``tokenizers`` package so that it gives the same ids as transformers' own
GGUF conversion (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), which the tests check.

About ``tokenizer.ggml.pre == "smollm"``: transformers splits such text with the plain GPT-2 regex, while
llama.cpp (and SmolLM2's original ``tokenizer.json``) first isolates every digit. The two differ only where a
run of two or more whitespace characters precedes a digit (``"a  1"``). This module follows transformers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from convert.errors import ConversionError

log = logging.getLogger(__name__)

# llama.cpp token types (llama_token_type / gguf.TokenType).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# The split pattern of the Llama 3 tokenizer (tiktoken-style: letters, 1-3 digit groups, punctuation runs).
_LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ``tokenizer.ggml.pre`` value -> split pattern; ``None`` means ByteLevel's built-in GPT-2 pattern.
PRE_TOKENIZER_PATTERNS: dict[str, str | None] = {
    "gpt2": None,
    "smollm": None,  # see the module docstring
    "llama-bpe": _LLAMA3_SPLIT_PATTERN,
    "llama3": _LLAMA3_SPLIT_PATTERN,
    "llama-v3": _LLAMA3_SPLIT_PATTERN,
    "smaug-bpe": _LLAMA3_SPLIT_PATTERN,
}


@dataclass(frozen=True)
class GGUFTokenizerFiles:
    """The contents of the tokenizer files of a Hugging Face directory."""

    tokenizer: Tokenizer
    tokenizer_config: dict[str, Any]
    special_tokens_map: dict[str, str]


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values.

    Bytes that are visible Latin-1 characters stand for themselves; every other byte (controls, space,
    0x7F-0xA0, 0xAD) gets the next unused code point from 256 upwards, in byte order.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {byte: chr(byte) for byte in visible}
    next_code_point = 256
    for byte in range(256):
        if byte not in spelling:
            spelling[byte] = chr(next_code_point)
            next_code_point += 1
    return spelling


def _in_byte_alphabet(token: str) -> bool:
    alphabet = set(byte_to_unicode().values())
    return all(char in alphabet for char in token)


def _byte_level_spelling(token: str) -> str:
    """``token`` written in the byte alphabet (tokens already written that way are returned unchanged)."""
    if _in_byte_alphabet(token):
        return token
    spelling = byte_to_unicode()
    return "".join(spelling[byte] for byte in token.encode("utf-8"))


def _require(metadata: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in metadata:
        raise ConversionError(f"{source} has no metadata field {key!r}, which a byte-level BPE tokenizer needs")
    return metadata[key]


def _split_merges(merges: list[str], source: str) -> list[tuple[str, str]]:
    pairs = []
    for rank, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ConversionError(
                f"{source}: tokenizer.ggml.merges[{rank}] is {merge!r}; expected two tokens separated by one space"
            )
        pairs.append((parts[0], parts[1]))
    return pairs


def _pre_tokenizer(pre_name: str, source: str) -> pre_tokenizers.PreTokenizer:
    if pre_name not in PRE_TOKENIZER_PATTERNS:
        raise ConversionError(
            f"{source}: tokenizer.ggml.pre is {pre_name!r}; expected one of {sorted(PRE_TOKENIZER_PATTERNS)}"
        )
    pattern = PRE_TOKENIZER_PATTERNS[pre_name]
    if pattern is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _post_processor(
    add_bos: bool, add_eos: bool, bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.PostProcessor:
    """Byte-level offsets, plus BOS/EOS insertion when the GGUF asks for it."""
    prefix = [bos] if add_bos and bos is not None else []
    suffix = [eos] if add_eos and eos is not None else []
    if not prefix and not suffix:
        return processors.ByteLevel(trim_offsets=False)
    head = " ".join(f"{token}:0" for token, _ in prefix)
    tail = " ".join(f"{token}:0" for token, _ in suffix)
    single = " ".join(part for part in (head, "$A:0", tail) if part)
    pair = " ".join(part for part in (single, head.replace(":0", ":1"), "$B:1", tail.replace(":0", ":1")) if part)
    return processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=single, pair=pair, special_tokens=list({*prefix, *suffix})),
        ]
    )


def _special_token(metadata: Mapping[str, Any], key: str, tokens: list[str], source: str) -> tuple[str, int] | None:
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    if token_id is None:
        return None
    token_id = int(token_id)
    if not 0 <= token_id < len(tokens):
        raise ConversionError(
            f"{source}: tokenizer.ggml.{key} is {token_id}; expected an id below the vocabulary size {len(tokens)}"
        )
    return _byte_level_spelling(tokens[token_id]), token_id


def build_tokenizer_files(metadata: Mapping[str, Any], source: str, model_max_length: int) -> GGUFTokenizerFiles:
    """The tokenizer, ``tokenizer_config.json`` and ``special_tokens_map.json`` contents for a GGUF.

    ``metadata`` maps GGUF keys to plain Python values (strings, ints, lists); ``source`` names the file in
    error messages.
    """
    model_kind = _require(metadata, "tokenizer.ggml.model", source)
    if model_kind != "gpt2":
        raise ConversionError(
            f"{source}: tokenizer.ggml.model is {model_kind!r}; only 'gpt2' (byte-level BPE) tokenizers are supported"
        )
    tokens: list[str] = list(_require(metadata, "tokenizer.ggml.tokens", source))
    merges = _split_merges(list(_require(metadata, "tokenizer.ggml.merges", source)), source)
    token_types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(token_types) != len(tokens):
        raise ConversionError(
            f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries; expected one per token ({len(tokens)})"
        )

    vocab = {_byte_level_spelling(token): token_id for token_id, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        log.warning("%s: %d tokens share a spelling with another; the later id wins", source, len(tokens) - len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt2")), source)
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens are matched whole and are special (skipped by decode(skip_special_tokens=True)).
    # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel of an ordinary token.
    control = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, token_types)
        if kind == TOKEN_TYPE_CONTROL and _in_byte_alphabet(token)
    ]
    tokenizer.add_special_tokens(control)
    # User-defined tokens are matched whole too, but are ordinary text.
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, token_types)
        if kind == TOKEN_TYPE_USER_DEFINED and token in vocab
    ]
    tokenizer.add_tokens(user_defined)

    specials = {
        name: _special_token(metadata, key, tokens, source)
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
    }
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    tokenizer.post_processor = _post_processor(add_bos, add_eos, specials["bos_token"], specials["eos_token"])

    special_tokens_map = {name: value[0] for name, value in specials.items() if value is not None}
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
    }
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template:
        tokenizer_config["chat_template"] = str(chat_template)
    return GGUFTokenizerFiles(tokenizer, tokenizer_config, special_tokens_map)


def write_tokenizer_files(files: GGUFTokenizerFiles, out_dir: Path | str) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``."""
    out = Path(out_dir)
    files.tokenizer.save(str(out / "tokenizer.json"))
    for name, content in (
        ("tokenizer_config.json", files.tokenizer_config),
        ("special_tokens_map.json", files.special_tokens_map),
    ):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
