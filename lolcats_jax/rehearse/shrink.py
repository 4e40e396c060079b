"""The shrink: a shipped config and its architecture made small enough for CPU processes, with everything that
shapes the distributed program kept.

Kept as shipped: number of layers; query and key/value head counts (so the GQA group and how heads split over the
`tensor` axis); the mesh axes and the device count; block size and index scheme; batch size, gradient
accumulation and epochs; how the evaluation and checkpoint intervals relate (equal, one a multiple of the other, or neither);
LoRA rank, alpha, dropout and targets; the stages; the data formats; the evaluation tasks; attention kind, window
kind, feature map and init; the optimizer and schedule.

Shrunk: hidden, head, MLP and feature widths; the vocabulary (a byte-level BPE trained on the rehearsal text);
sequence length, window and attention chunk; step counts (just past the larger interval, or the epochs over just
enough samples for one step per epoch); evaluation sizes; the data. Weights and compute are float32, so that a
cluster-shaped run can be compared with a one-device run to tight tolerance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lolcats_jax.config import Config

# the widths every rehearsal uses (small, and divisible by the mesh axes the shipped configs use)
HIDDEN = 64  # raised to the head count where that is larger (transformers wants hidden % heads == 0)
HEAD_DIM = 8  # lowered so that heads × head_dim stays ≤ 512 (Llama-3.1-405B's 128 heads get 4)
MLP = 128
VOCAB = 512
SEQ = 16
WINDOW = 4  # four terraced blocks in SEQ: queries of the last two see keys through the linear part
FEATURE_DIM = 8
ATTENTION_CHUNK = 4
EVAL_BATCHES = 1
VAL_ROWS = 8  # validation chunks at least (the evaluate stage's attention MSE gives every process a row)
TASK_DOCS = 1


def shrink_architecture(arch: dict[str, Any], vocab_size: int = VOCAB) -> dict[str, Any]:
    """A Hugging Face `config.json` dict with the widths and vocabulary shrunk; layer and head counts, rope,
    family options and tied embeddings as shipped."""
    out = dict(arch)
    heads = int(arch["num_attention_heads"])
    hidden = HIDDEN * math.ceil(heads / HIDDEN) if heads > HIDDEN else HIDDEN
    head_dim = max(2, min(HEAD_DIM, 512 // heads))
    out.update(hidden_size=hidden, head_dim=head_dim, intermediate_size=max(MLP, hidden), vocab_size=vocab_size,
               torch_dtype="float32",
               # weights of std 1/sqrt(width): attention that is neither uniform nor one-hot, so that attention
               # transfer has something to learn (at 0.02 the teacher's attention is near uniform and the MSE ~1e-13)
               initializer_range=hidden**-0.5)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out.pop(key, None)
    return out


@dataclasses.dataclass(frozen=True)
class Steps:
    """Shrunk step counts of one training section."""

    max_steps: int
    eval_every: int
    checkpoint_every: int
    train_samples: int  # training samples the run reads (per epoch with epochs)


def shrink_intervals(eval_every: int, checkpoint_every: int) -> tuple[int, int]:
    """The smallest (eval_every, checkpoint_every) with the shipped relation: equal, one a multiple of the other
    (which one), or neither (and which is larger) — what decides which events share a step and what a kill between
    them replays."""
    e, c = eval_every, checkpoint_every
    if e == c:
        return 1, 1
    if e % c == 0:
        return 2, 1
    if c % e == 0:
        return 1, 2
    return (3, 2) if e > c else (2, 3)


def shrink_steps(max_steps: int, eval_every: int, checkpoint_every: int, epochs: int | None, global_batch: int) -> Steps:
    """Intervals shrunk by `shrink_intervals`; a run just long enough to pass the larger one. With `epochs`, each
    epoch gets just enough samples for that (at least one optimizer step)."""
    e, c = shrink_intervals(eval_every, checkpoint_every)
    want = max(e, c) + 1
    if epochs is None:
        steps = min(max_steps, want)
        return Steps(steps, e, c, steps * global_batch)
    per_epoch = max(1, math.ceil(want / epochs))
    return Steps(per_epoch * epochs, e, c, per_epoch * global_batch)


def shrink_overrides(cfg: Config, *, model_dir: str, data: dict[str, str], run_dir: str, store_dir: str) -> list[str]:
    """Dotted overrides that turn shipped `cfg` into its rehearsal: `data` names the files the rehearsal wrote
    ({"text": …, "alpaca": …, "heldout": …})."""
    out = [
        f"run.dir={run_dir}", f"model.path={model_dir}", "model.checkpoint=null", "model.architecture=null",
        "model.param_dtype=float32", "model.compute_dtype=float32",
        f"attention.window_size={WINDOW}", f"attention.feature_dim={FEATURE_DIM}", f"attention.chunk_size={ATTENTION_CHUNK}",
        "attention.backend=chunked",  # what runs on CPU (AUTO would pick it too); the GPU kernels run per shard
    ]
    for name in ("distill", "finetune"):
        sec = getattr(cfg, name)
        global_batch = sec.batch_size * sec.optim.grad_accum
        st = shrink_steps(sec.max_steps, sec.eval_every, sec.checkpoint_every, sec.epochs, global_batch)
        fmt = sec.data.format if sec.data.format in ("text", "alpaca") else "text"
        out += [
            f"{name}.data.format={fmt}", f"{name}.data.train=[{data[fmt]}]", f"{name}.data.validation=[]",
            f"{name}.data.chunk_size={SEQ}", f"{name}.data.val_size={EVAL_BATCHES * max(sec.batch_size, VAL_ROWS)}",
            f"{name}.data.tokenizer=null", f"{name}.data.max_train_chunks=null",
            f"{name}.max_steps={st.max_steps}", f"{name}.eval_every={st.eval_every}", f"{name}.checkpoint_every={st.checkpoint_every}",
            f"{name}.eval_batches={EVAL_BATCHES}", f"{name}.optim.warmup_steps={min(sec.optim.warmup_steps, 1)}",
        ]
        if name == "distill" and _blockwise(cfg):  # the block jobs read collected samples
            out += [f"block.max_train_samples={st.train_samples}", f"block.max_val_samples={EVAL_BATCHES * max(sec.batch_size, VAL_ROWS)}"]
        elif sec.epochs is not None:
            out.append(f"{name}.data.max_train_chunks={st.train_samples}")
    if _blockwise(cfg):
        out += [f"block.store={store_dir}", "block.ignore_disk_check=false"]
    ev = cfg.evaluate
    # one document per task; MMLU without its five solved examples (a 5-shot prompt is ~1.5K tokens of this
    # tokenizer — minutes per model through 80 layers on 8 CPU devices — and only its length differs)
    out += [f"evaluate.limit={TASK_DOCS}", f"evaluate.mmlu_limit={TASK_DOCS}", "evaluate.mmlu_subjects=1", "evaluate.mmlu_shots=0",
            f"evaluate.attention_mse_batches={min(ev.attention_mse_batches, 1)}", "evaluate.max_perplexity_tokens=128",
            "evaluate.compare_runs=[]", "evaluate.long_context=[]"]
    if ev.perplexity:
        out.append(f"evaluate.perplexity=[{data['heldout']}]")
    return out


def _blockwise(cfg: Config) -> bool:
    return any(s in cfg.run.stages for s in ("collect", "distill_block"))
