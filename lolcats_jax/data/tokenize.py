"""Rendering and tokenising records into (input_ids, labels) samples.

Alpaca records (LoLCATS ``alpaca_clean.py``): the prompt is rendered with the Alpaca template (or the
tokenizer's chat template) and tokenised with the tokenizer's special tokens; the answer ``output`` is
tokenised *separately* without special tokens and the EOS id is appended, so no BPE merge crosses the
prompt/answer boundary. ``labels`` are ``IGNORE`` on the prompt and equal to the ids on the answer.

Text documents (LoLCATS ``redpajama_sample.py``): ids with the tokenizer's special tokens (a BOS when the
tokenizer adds one) followed by the EOS id; ``labels = input_ids``.

Samples are numpy ``int32`` vectors of one length each (notation: s = sample tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lolcats_jax.data.sources import AlpacaRecord, Record
from lolcats_jax.errors import DataError

IGNORE = -100  # label of tokens that carry no loss (cross-entropy ignore_index)
TEMPLATES = ("alpaca", "chat")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Sample = tuple[np.ndarray, np.ndarray]  # (input_ids_s, labels_s), int32
_BATCH = 256  # texts per tokenizer call


def render_alpaca_prompt(record: AlpacaRecord) -> str:
    """The Alpaca prompt of a record; the "no input" version when ``input`` is empty."""
    if record.input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=record.instruction, input=record.input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record.instruction)


def chat_user_message(record: AlpacaRecord) -> str:
    """The user turn for the chat template: the instruction, then ``"\\n\\n"`` and the input if any."""
    return f"{record.instruction}\n\n{record.input}" if record.input else record.instruction


def render_chat_prompt(record: AlpacaRecord, tokenizer: Any) -> str:
    """The chat-template prompt (one user turn plus the assistant header); it already holds the specials."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template is 'chat' but the tokenizer has no chat template (expected template: alpaca)")
    messages = [{"role": "user", "content": chat_user_message(record)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def eos_token_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id; a ``DataError`` when it has none (samples must end with EOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS token (expected eos_token in tokenizer_config.json)")
    return int(eos)


def _encode(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of many texts (batched calls; ``verbose=False`` silences the long-document warning)."""
    out: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        batch = list(texts[start : start + _BATCH])
        encoded = tokenizer(batch, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
        out.extend(list(ids) for ids in encoded)
    return out


def tokenize_alpaca(records: Sequence[AlpacaRecord], tokenizer: Any, template: str = "alpaca") -> list[Sample]:
    """Prompt/answer samples of Alpaca records, labels ``IGNORE`` on the prompt tokens.

    ``template="alpaca"``: the prompt string is encoded with ``add_special_tokens=True`` (a BOS when the
    tokenizer adds one). ``template="chat"``: the rendered chat prompt already contains the template's special
    tokens, so it is encoded with ``add_special_tokens=False`` to avoid a doubled BOS.
    """
    if template not in TEMPLATES:
        raise DataError(f"data.template: unknown template {template!r} (expected one of {', '.join(TEMPLATES)})")
    if template == "chat":
        prompts = _encode(tokenizer, [render_chat_prompt(r, tokenizer) for r in records], add_special_tokens=False)
    else:
        prompts = _encode(tokenizer, [render_alpaca_prompt(r) for r in records], add_special_tokens=True)
    answers = _encode(tokenizer, [r.output for r in records], add_special_tokens=False)
    eos = eos_token_id(tokenizer)
    samples: list[Sample] = []
    for prompt_ids, answer_ids in zip(prompts, answers, strict=True):
        answer_ids = answer_ids + [eos]
        ids = np.asarray(prompt_ids + answer_ids, dtype=np.int32)
        labels = np.asarray([IGNORE] * len(prompt_ids) + answer_ids, dtype=np.int32)
        samples.append((ids, labels))
    return samples


def tokenize_text(documents: Sequence[str], tokenizer: Any) -> list[Sample]:
    """Language-modelling samples: ids (with the tokenizer's specials) + EOS; labels equal the ids."""
    eos = eos_token_id(tokenizer)
    samples: list[Sample] = []
    for ids in _encode(tokenizer, documents, add_special_tokens=True):
        array = np.asarray(ids + [eos], dtype=np.int32)
        samples.append((array, array.copy()))
    return samples


def tokenize_records(records: Sequence[Record], tokenizer: Any, template: str = "alpaca") -> list[Sample]:
    """Dispatch on the record kind: :func:`tokenize_alpaca` or :func:`tokenize_text`."""
    if not records:
        return []
    if isinstance(records[0], AlpacaRecord):
        return tokenize_alpaca(records, tokenizer, template)  # type: ignore[arg-type]
    return tokenize_text(records, tokenizer)  # type: ignore[arg-type]
