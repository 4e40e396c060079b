"""Window sweep judged on the loss by position (issue 14): which sliding-window size buys what, beyond the 1K
perplexity that hides the linear part's behaviour at long range.

    python benchmarks/window_sweep.py [--base configs/smollm2_quality.yaml] [--windows 64,128,256,512]
        [--chunk 4096] [--steps 25] [--runs runs/window_sweep] [--out benchmarks/results/window_sweep_smollm2]

Every window trains attention transfer alone (`distill`) from the base config with `attention.window_size=W`, the
same number of `--steps` of `--chunk`-token sequences (equal tokens; each row states its measured tokens/s, the
training cost) into `<runs>/w<W>`, then is scored with `python -m lolcats_jax.evaluate`: the mean NLL per band of
positions over the base config's `evaluate.long_context` text (`--lc-windows` windows of `--chunk` tokens) and the
perplexity of its first `evaluate.perplexity` text in 1,024-token windows. The teacher is scored the same way once.
Re-running resumes (finished trainings and scorings are skipped). Prints a markdown table and writes `<out>.json` and
`<out>.md` after every window.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from lolcats_jax.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=ROOT / "configs" / "smollm2_quality.yaml")
    ap.add_argument("--windows", default="64,128,256,512")
    ap.add_argument("--chunk", type=int, default=4096, help="training sequence length and scoring window length")
    ap.add_argument("--steps", type=int, default=25, help="distill steps per window (25 × 4,096 = 102K tokens)")
    ap.add_argument("--lc-windows", type=int, default=4, help="long-context windows scored")
    ap.add_argument("--ppl-tokens", type=int, default=20480)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "window_sweep")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "window_sweep_smollm2")
    args = ap.parse_args(argv)
    try:
        windows = [int(w) for w in args.windows.split(",")]
    except ValueError:
        print(f"error: --windows {args.windows!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    base = load_config(args.base)
    if not base.evaluate.long_context or not base.evaluate.perplexity:
        print(f"error: {args.base}: evaluate.long_context and evaluate.perplexity must name the texts to score",
              file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    scoring = ["--perplexity", base.evaluate.perplexity[0], "--ppl-chunk-len", "1024", "--ppl-max-tokens",
               str(args.ppl_tokens), "--long-context", base.evaluate.long_context[0], "--long-context-length",
               str(args.chunk), "--long-context-windows", str(args.lc_windows)]
    rows: dict[str, dict] = {}
    json_path = args.out.with_suffix(".json")
    if json_path.exists():  # rows of an earlier invocation with the same setup are kept (one table per setup)
        old = json.loads(json_path.read_text())
        if old.get("setup") != _setup(args):
            print(f"error: {json_path} holds a sweep of another setup ({old.get('setup')}, this one: {_setup(args)}); "
                  "give a new --out and --runs", file=sys.stderr)
            return 2
        rows = old.get("rows", {})
    args.runs.mkdir(parents=True, exist_ok=True)
    teacher = _score(base.model.path, args.runs / "teacher.json", scoring, env)
    if teacher is None:
        return 1
    for w in windows:
        run_dir = args.runs / f"w{w}"
        over = [f"run.dir={run_dir}", "run.stages=[distill]", f"attention.window_size={w}",
                f"distill.data.chunk_size={args.chunk}", f"distill.max_steps={args.steps}",
                f"distill.eval_every={args.steps}", "distill.eval_batches=2", "distill.checkpoint_every=5",
                "distill.snapshot_every=null"]
        print(f"[window_sweep] window {w}: training ({args.steps} × {args.chunk} tokens)", file=sys.stderr, flush=True)
        res = subprocess.run([sys.executable, "-m", "lolcats_jax.train", "--config", str(args.base), *over], cwd=ROOT, env=env)
        if res.returncode:
            print(f"error: window {w}: training exited {res.returncode} ({run_dir})", file=sys.stderr)
            return 1
        scored = _score(str(run_dir), args.runs / f"w{w}.json", scoring, env)
        if scored is None:
            return 1
        done = json.loads((run_dir / "distill" / "done.json").read_text())
        rows[str(w)] = {"window": w, "tokens": args.steps * args.chunk, "tokens_per_s": done.get("tokens_per_s"),
                        "best_eval_loss": done.get("best_eval_loss"), "bands": scored["long_context"]["bands"],
                        "nll": scored["long_context"]["nll"], "ppl": scored["perplexity"]["ppl"]}
        _write(args, teacher, rows)
    print(_markdown(args, teacher, rows))
    return 0


def _score(model: str, out: Path, scoring: list[str], env: dict) -> dict | None:
    if not out.exists():
        res = subprocess.run([sys.executable, "-m", "lolcats_jax.evaluate", "--model", model, *scoring, "--out", str(out)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        if res.returncode:
            print(f"error: scoring {model} exited {res.returncode}", file=sys.stderr)
            return None
    return json.loads(out.read_text())


BANDS = ((0, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192))


def _band_nll(bands: list, lo: int, hi: int) -> float | None:
    """Token-weighted mean NLL of the evaluator's bands inside [lo, hi) (its bands double: 0-63, 64-127, …)."""
    inside = [(b0, b1, nll) for b0, b1, nll in bands if b0 >= lo and b1 <= hi]
    if not inside:
        return None
    return sum((b1 - b0) * nll for b0, b1, nll in inside) / sum(b1 - b0 for b0, b1, _ in inside)


def _markdown(args, teacher: dict, rows: dict) -> str:
    t_bands = teacher["long_context"]["bands"]
    cols = [(lo, hi) for lo, hi in BANDS if _band_nll(t_bands, lo, hi) is not None]
    head = " | ".join(f"{lo:,}–{hi - 1:,}" for lo, hi in cols)
    lines = [f"Attention transfer only, {args.steps} × {args.chunk:,} tokens per window (`{args.base.name}`); loss by "
             f"position over {args.lc_windows} windows of {args.chunk:,} tokens of the long-context text, as a multiple "
             "of the teacher's perplexity in each band (exp of the NLL difference); news perplexity in 1,024-token "
             "windows.", "",
             f"| window | distill tokens/s | {head} | all | news ppl (× teacher) |",
             "|---:|---:|" + "---:|" * len(cols) + "---:|---:|",
             "| teacher (NLL) | | " + " | ".join(f"{_band_nll(t_bands, lo, hi):.3f}" for lo, hi in cols)
             + f" | {teacher['long_context']['nll']:.3f} | {teacher['perplexity']['ppl']:.2f} |"]
    for r in sorted(rows.values(), key=lambda r: r["window"]):
        mult = [math.exp(_band_nll(r["bands"], lo, hi) - _band_nll(t_bands, lo, hi)) for lo, hi in cols]
        lines.append(f"| {r['window']} | {r['tokens_per_s']:.0f} | " + " | ".join(f"{m:.3f}×" for m in mult)
                     + f" | {math.exp(r['nll'] - teacher['long_context']['nll']):.3f}× | {r['ppl']:.2f} "
                     f"({r['ppl'] / teacher['perplexity']['ppl']:.3f}×) |")
    return "\n".join(lines)


def _setup(args) -> dict:
    return {"base": args.base.name, "chunk": args.chunk, "steps": args.steps, "lc_windows": args.lc_windows,
            "ppl_tokens": args.ppl_tokens}


def _write(args, teacher: dict, rows: dict) -> None:
    from lolcats_jax.fsio import write_text_atomic

    write_text_atomic(args.out.with_suffix(".json"), json.dumps({"setup": _setup(args), "teacher": teacher, "rows": rows}, indent=1))
    write_text_atomic(args.out.with_suffix(".md"), _markdown(args, teacher, rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
