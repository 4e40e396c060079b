"""Ablations at an equal short budget: which recipe choices matter for SmolLM2 (issue 14, part 4).

    python benchmarks/ablate.py [--base configs/smollm2_quality.yaml] [--steps 200] [--ft-steps 50]
        [--only name,…] [--out benchmarks/results/ablations_smollm2]

Every variant is the base config with `distill.max_steps=--steps` plus its own overrides, trained into
`runs/ablate/<name>` (re-running resumes: finished runs are skipped); the LoRA variants start from a copy of the
`distill:base` run and add `--ft-steps` finetune steps and scored by `benchmarks/quality_curve.py --only` on one fixed subset: held-out perplexity of the base
config's `evaluate.perplexity` text and accuracy on the first `--limit` documents of each `--tasks` task. Prints a
markdown table and writes `<out>.json` / `<out>.md` (each point as soon as it is scored). One table holds one setup
(base config by content, budget, scoring subset): a re-run with another is refused; give it a new --out and --runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name → overrides. "distill:" variants train attention transfer only; "lora:" ones also finetune.
VARIANTS: dict[str, tuple[str, ...]] = {
    "distill:base": (),
    "distill:lr_3e-3": ("distill.optim.lr=0.003",),
    "distill:lr_3e-2": ("distill.optim.lr=0.03",),
    "distill:kaiming_init": ("attention.feature_init=kaiming",),
    "distill:feature_dim_128": ("attention.feature_dim=128",),
    # configs/smollm2_quality.yaml has window 128 since the 2026-12-04 ablations (window_128 there: 1.37x vs 1.61x)
    "distill:window_64": ("attention.window_size=64",),
    "distill:window_256": ("attention.window_size=256",),
    "distill:attention_xent": ("distill.xent_factor=1.0",),
    "lora:base": (),
    "lora:lr_1e-4": ("finetune.optim.lr=0.0001",),
    "lora:lr_1e-3": ("finetune.optim.lr=0.001",),
    "lora:rank_16": ("finetune.lora.rank=16", "finetune.lora.alpha=32"),
    "lora:qkvo_mlp": ("finetune.lora.targets=[q,k,v,o,gate,up,down]",),
    "lora:kl": ("finetune.xent_factor=0", "finetune.kl_factor=1"),  # KL to the softmax teacher instead of the text
    # the paper's LoRA data (Alpaca-format records) instead of the base config's plain text: on 2026-12-04 (then the
    # base) it made held-out news perplexity worse, 1.61x -> 2.04x, where plain text gave 1.41x (quality_smollm2.md)
    "lora:alpaca": ("finetune.data.format=alpaca", "finetune.data.train=[data/quality/alpaca_train.jsonl]",
                    "finetune.data.validation=[data/quality/alpaca_val.jsonl]"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=ROOT / "configs" / "smollm2_quality.yaml")
    ap.add_argument("--steps", type=int, default=200, help="distill steps per variant (of the base config's distill.data.chunk_size tokens)")
    ap.add_argument("--ft-steps", type=int, default=50, help="LoRA steps of the lora: variants")
    ap.add_argument("--tasks", default="arc_easy,hellaswag,piqa")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablate")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ablations_smollm2")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    if any(n.startswith("lora:") for n in names) and "distill:base" not in names:
        names.insert(0, "distill:base")  # the LoRA variants all start from its attention transfer
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: --only: unknown variants {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rows: dict[str, dict] = {}
    json_path = args.out.with_suffix(".json")
    setup = _setup(args)
    if json_path.exists():
        old = json.loads(json_path.read_text())
        if old.get("setup") != setup:
            # rows of another base config or budget must not be mixed into this table (nor its run dirs reused:
            # the trainer refuses a run dir whose config changed)
            print(f"error: {json_path} holds an ablation of another setup ({old.get('setup')}, this one: {setup}); "
                  f"give a new --out and --runs", file=sys.stderr)
            return 2
        rows = old.get("rows", {})
    for name in names:
        kind, _, label = name.partition(":")
        run_dir = args.runs / name.replace(":", "_")
        stages = "[distill]" if kind == "distill" else "[distill,finetune]"
        if kind == "lora" and not run_dir.exists():
            # the base variant's finished attention transfer, copied whole (the run dir then only adds finetune)
            tmp = run_dir.with_name(run_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(args.runs / "distill_base", tmp)
            os.replace(tmp, run_dir)
        over = [f"run.dir={run_dir}", f"run.stages={stages}", f"distill.max_steps={args.steps}",
                f"finetune.max_steps={args.ft_steps}", "distill.snapshot_every=null", "finetune.snapshot_every=null",
                f"distill.eval_every={max(1, args.steps // 2)}", f"finetune.eval_every={max(1, args.ft_steps // 2)}",
                *VARIANTS[name]]
        cmd = [sys.executable, "-m", "lolcats_jax.train", "--config", str(args.base), *over]
        print(f"[ablate] {name}: {' '.join(VARIANTS[name]) or '(base)'}", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, cwd=ROOT, env=env)
        if res.returncode:
            print(f"error: {name}: training exited {res.returncode} ({run_dir})", file=sys.stderr)
            return 1
        point = "distill:final" if kind == "distill" else "finetune:final"
        curve = run_dir / "subset"
        # the teacher does not depend on the variant: scored with the first variant, reused by the others
        teacher = next((r["teacher"] for r in rows.values() if "teacher" in r), None)
        only = point if teacher else f"teacher,{point}"
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality_curve.py"), "--run", str(run_dir),
                              "--tasks", args.tasks, "--limit", str(args.limit), "--ppl-tokens", str(args.ppl_tokens),
                              "--only", only, "--out", str(curve)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL)
        if res.returncode:
            print(f"error: {name}: scoring exited {res.returncode}", file=sys.stderr)
            return 1
        points = json.loads(curve.with_suffix(".json").read_text())["points"]
        teacher = teacher or {"ppl": points["teacher"]["ppl"], "mean_acc": points["teacher"]["mean_acc"],
                              "tasks": points["teacher"]["tasks"]}
        done = json.loads((run_dir / ("distill" if kind == "distill" else "finetune") / "done.json").read_text())
        rows[name] = {"overrides": list(VARIANTS[name]), "ppl": points[point]["ppl"], "mean_acc": points[point]["mean_acc"],
                      "tasks": points[point]["tasks"], "teacher": teacher, "best_eval_loss": done.get("best_eval_loss"),
                      "tokens_per_s": done.get("tokens_per_s")}
        _write(args, rows)
    print(_markdown(args, rows))
    return 0


def _markdown(args, rows: dict) -> str:
    lines = [f"Held-out perplexity ({args.ppl_tokens} tokens) and mean accuracy ({args.tasks}, first {args.limit} each) "
             f"after {args.steps} distill steps (LoRA variants: + {args.ft_steps} finetune steps) of `{args.base.name}`.",
             "", "| variant | overrides | best eval loss | held-out ppl (× teacher) | mean acc (teacher) |",
             "|---|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {' '.join(r['overrides']) or '—'} | {r['best_eval_loss']:.4g} | {r['ppl']:.3f} "
                     f"({r['ppl'] / r['teacher']['ppl']:.3f}×) | {r['mean_acc']:.4f} ({r['teacher']['mean_acc']:.4f}) |")
    return "\n".join(lines)


def _setup(args) -> dict:
    """What every row of one table shares: the base config (by content), the budget and the scoring subset."""
    return {"base": args.base.name, "base_sha256": hashlib.sha256(args.base.read_bytes()).hexdigest()[:16],
            "steps": args.steps, "ft_steps": args.ft_steps, "tasks": args.tasks, "limit": args.limit,
            "ppl_tokens": args.ppl_tokens}


def _write(args, rows: dict) -> None:
    from lolcats_jax.fsio import write_text_atomic

    write_text_atomic(args.out.with_suffix(".json"), json.dumps({"rows": rows, "setup": _setup(args)}, indent=1))
    write_text_atomic(args.out.with_suffix(".md"), _markdown(args, rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
