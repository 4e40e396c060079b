"""Quality against training tokens: score the parameter snapshots of a run on a fixed evaluation subset.

    python benchmarks/quality_curve.py --run runs/smollm2_quality [--tasks arc_easy,hellaswag,piqa] [--limit 100]
        [--ppl-tokens 8192] [--ppl-chunk 1024] [--long-windows 4] [--out benchmarks/results/quality_curve_smollm2]

The run's stages must have been trained with `snapshot_every` (configs/smollm2_quality.yaml sets it): every N-th
step's trainable parameters are under `<run>/<stage>/snapshots/<step>`. Points, in token order: the softmax teacher
(a reference line), the freshly linearized model (step 0: initial feature maps), every distill snapshot, the distill
result the later stages use (`distill/final`, the best evaluated step), every LoRA snapshot on top of that result,
and `finetune/final`. Each point is the held-out perplexity of the first `--ppl-tokens` tokens of the config's
`evaluate.perplexity` files (windows of `--ppl-chunk` tokens, by default those of the evaluate stage) and accuracy on the first `--limit` documents of each
task. With `--long-windows N`, each point also gets the loss by position over N windows of the config's
`evaluate.long_context` text (`evaluate.long_context_length` positions each): the curve then shows, beside the
perplexity, the perplexity beyond position 1,024 as a multiple of the teacher's there — what a model trained at a
long length gains in the range that 1K-window perplexity never reaches. Writes `<out>.json` (rewritten atomically after every point: a re-run on the same run scores only the missing
points) and `<out>.png`, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _snapshots(stage_dir: Path) -> list[tuple[int, Path]]:
    snap = stage_dir / "snapshots"
    if not snap.is_dir():
        return []
    return sorted((int(p.name), p) for p in snap.iterdir() if p.name.isdigit())


def _tokens_per_step(section) -> int:
    return section.batch_size * section.optim.grad_accum * section.data.chunk_size


def plan_points(run_dir: Path, cfg) -> list[dict]:
    """The curve's points: name, stage, training tokens, and what to load (None: the teacher / fresh maps)."""
    d_tok = _tokens_per_step(cfg.distill)
    f_tok = _tokens_per_step(cfg.finetune)
    points = [{"name": "teacher", "kind": "teacher", "tokens": 0},
              {"name": "distill:0", "kind": "distill", "tokens": 0, "attention": None}]
    for step, path in _snapshots(run_dir / "distill"):
        points.append({"name": f"distill:{step}", "kind": "distill", "tokens": step * d_tok, "attention": str(path)})
    final = run_dir / "distill" / "final"
    if final.exists():
        meta = json.loads((run_dir / "distill" / "done.json").read_text()) if (run_dir / "distill" / "done.json").exists() else {}
        distill_tokens = int(meta.get("steps", cfg.distill.max_steps)) * d_tok
        points.append({"name": "distill:final", "kind": "distill", "tokens": distill_tokens, "attention": str(final)})
        for step, path in _snapshots(run_dir / "finetune"):
            points.append({"name": f"finetune:{step}", "kind": "finetune", "tokens": distill_tokens + step * f_tok,
                           "attention": str(final), "lora": str(path)})
        ft_final = run_dir / "finetune" / "final"
        if ft_final.exists():
            steps = json.loads((run_dir / "finetune" / "done.json").read_text()).get("steps", cfg.finetune.max_steps)
            points.append({"name": "finetune:final", "kind": "finetune", "tokens": distill_tokens + int(steps) * f_tok,
                           "attention": str(final), "lora": str(ft_final)})
    return points


def _run_fingerprint(run_dir: Path) -> str:
    """sha256 of the run's config record and its training stages' done markers: points scored on another run kept
    in the same directory (a re-made run, other settings) are never reused."""
    import hashlib

    h = hashlib.sha256()
    for path in [run_dir / "config.yaml"] + [run_dir / stage / "done.json" for stage in ("distill", "finetune")]:
        h.update(str(path.relative_to(run_dir)).encode() + b"\0" + (path.read_bytes() if path.exists() else b""))
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="run directory (holds config.yaml)")
    ap.add_argument("--tasks", default="arc_easy,hellaswag,piqa",
                    help="comma-separated tasks scored at every point; '' for perplexity only")
    ap.add_argument("--limit", type=int, default=100, help="documents per task (the first N: the same every point)")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--ppl-chunk", type=int, default=None,
                    help="tokens per perplexity window (default: the run config's evaluate.perplexity_chunk_len, else its distill chunk size)")
    ap.add_argument("--long-windows", type=int, default=0, metavar="N",
                    help="also score the loss by position over N windows of evaluate.long_context (0: off)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--only", default=None, metavar="NAME,…",
                    help="score only these points (e.g. teacher,distill:final: benchmarks/ablate.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality_curve_smollm2")
    args = ap.parse_args(argv)

    import jax

    from lolcats_jax import compat
    from lolcats_jax.config import load_config, perplexity_chunk_len
    from lolcats_jax.eval.runner import evaluate_tasks
    from lolcats_jax.eval.scoring import Scorer
    from lolcats_jax.eval.position_loss import position_loss
    from lolcats_jax.eval.stage import heldout_ids, long_context_ids
    from lolcats_jax.errors import UserError
    from lolcats_jax.eval.tasks import load_task
    from lolcats_jax.fsio import write_text_atomic
    from lolcats_jax.model.llama_config import LlamaConfig
    from lolcats_jax.sharding import MeshShape, make_mesh
    from lolcats_jax.tokenizer import load_tokenizer
    from lolcats_jax.train.stages import RunContext, load_base, load_params_into

    if not (args.run / "config.yaml").is_file():
        print(f"error: {args.run}: not a run directory (no config.yaml)", file=sys.stderr)
        return 2
    cfg = load_config(args.run / "config.yaml")
    tok = load_tokenizer(cfg.model.path)
    mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    ctx = RunContext(cfg=cfg, run_dir=args.run, mesh=mesh, llama_cfg=LlamaConfig.from_hf_dir(cfg.model.path), tokenizer=tok)
    ids = heldout_ids(ctx, args.ppl_tokens)
    if not ids:
        print(f"error: {args.run}/config.yaml: evaluate.perplexity names no held-out text", file=sys.stderr)
        return 2
    ppl_chunk = args.ppl_chunk or perplexity_chunk_len(cfg)
    long_ids: list[int] = []
    if args.long_windows < 0:
        print(f"error: --long-windows {args.long_windows}: expected ≥ 0", file=sys.stderr)
        return 2
    if args.long_windows:
        if not cfg.evaluate.long_context:
            print(f"error: --long-windows {args.long_windows}: {args.run}/config.yaml sets no evaluate.long_context text",
                  file=sys.stderr)
            return 2
        ev = dataclasses.replace(cfg.evaluate, long_context_windows=args.long_windows)
        try:
            long_ids = long_context_ids(dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, evaluate=ev)))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if len(long_ids) < args.long_windows * (ev.long_context_length + 1):
            print(f"error: --long-windows {args.long_windows}: evaluate.long_context {list(ev.long_context)} holds "
                  f"{len(long_ids)} tokens, fewer than {args.long_windows} windows of {ev.long_context_length} + 1",
                  file=sys.stderr)
            return 2
    tasks = [load_task(name, limit=args.limit) for name in args.tasks.split(",") if name.strip()]

    json_path = args.out.with_suffix(".json")
    done = json.loads(json_path.read_text()) if json_path.exists() else {}
    setup = {"run": str(args.run), "run_content": _run_fingerprint(args.run), "tasks": args.tasks, "limit": args.limit,
             "ppl_tokens": len(ids), "ppl_chunk": ppl_chunk}
    if long_ids:
        setup.update(long_windows=args.long_windows, long_length=cfg.evaluate.long_context_length)
    results: dict = done.get("points", {}) if done.get("setup") == setup else {}
    cache: dict = {}
    models: dict = {}
    with compat.set_mesh(mesh):
        only = set(args.only.split(",")) if args.only else None
        for point in plan_points(args.run, cfg):
            if point["name"] in results or (only is not None and point["name"] not in only):
                continue
            t0 = time.perf_counter()
            kind = point["kind"]
            fresh = kind == "distill" and not point.get("attention")  # step 0: the initial feature maps
            if kind not in models or fresh:
                models.clear()  # one model alive at a time
                models[kind] = load_base(ctx, linearize=kind != "teacher",
                                         lora=cfg.finetune.lora if kind == "finetune" else None, base_cache=cache)
            model = models[kind]
            if point.get("attention"):
                load_params_into(model, Path(point["attention"]))
            if point.get("lora"):
                load_params_into(model, Path(point["lora"]))
            scorer = Scorer(model)
            ppl = scorer.perplexity(ids, ppl_chunk, None, args.batch_size)
            accs = evaluate_tasks(scorer, tok, tasks, args.batch_size)
            long = position_loss(scorer, long_ids, cfg.evaluate.long_context_length).as_dict() if long_ids else None
            results[point["name"]] = {
                "tokens": point["tokens"], "kind": kind, "ppl": ppl.ppl, "long_context": long,
                "tasks": {k: {"acc": v["acc"], "acc_norm": v.get("acc_norm"), "n": v["n"]} for k, v in accs.items()},
                "mean_acc": sum(v["acc"] for v in accs.values()) / len(accs) if accs else None,
                "seconds": time.perf_counter() - t0,
            }
            write_text_atomic(json_path, json.dumps({"setup": setup, "points": results}, indent=1))
            print(f"{point['name']}: ppl {ppl.ppl:.3f}, mean acc {_acc(results[point['name']]['mean_acc'])} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    _table(results, args)
    _plot(results, args.out.with_suffix(".png"), setup)
    return 0


def _acc(mean_acc) -> str:
    return "–" if mean_acc is None else f"{mean_acc:.4f}"


def _far(long: dict | None) -> tuple[int, float] | None:
    """(first position, mean NLL) of the positions from 1,024 on (from the last band's start in windows of ≤ 1,024
    positions) of a point's loss by position, or None."""
    if not long:
        return None
    start = 1024 if long["length"] > 1024 else long["bands"][-1][0]
    far = [(hi - lo, nll) for lo, hi, nll in long["bands"] if lo >= start]
    return start, sum(n * nll for n, nll in far) / sum(n for n, _ in far)


def _far_ratio(results: dict, name: str) -> float | None:
    """A point's perplexity beyond position 1,024 as a multiple of the teacher's there, or None."""
    mine, teacher = _far(results[name].get("long_context")), _far((results.get("teacher") or {}).get("long_context"))
    return None if mine is None or teacher is None else math.exp(mine[1] - teacher[1])


def _table(results: dict, args) -> None:
    longs = [r["long_context"] for r in results.values() if r.get("long_context")]
    head = f"| point | training tokens | held-out ppl | mean acc ({args.tasks}, n={args.limit} each) |"
    if longs:
        start = _far(longs[0])[0]
        head += f" NLL at positions ≥ {start:,} ({longs[0]['windows']} × {longs[0]['length']:,}) | its ppl × teacher |"
    print(head)
    print("|---|---:|---:|---:|" + ("---:|---:|" if longs else ""))
    for name, r in sorted(results.items(), key=lambda kv: (kv[1]["tokens"], kv[1]["kind"] != "teacher")):
        row = f"| {name} | {r['tokens']:,} | {r['ppl']:.3f} | {_acc(r['mean_acc'])} |"
        if longs:
            far, ratio = _far(r.get("long_context")), _far_ratio(results, name)
            row += f" {'–' if far is None else f'{far[1]:.4f}'} | {'–' if ratio is None else f'{ratio:.3f}×'} |"
        print(row)


def _plot(results: dict, path: Path, setup: dict) -> None:
    import matplotlib

    from lolcats_jax.fsio import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = results.get("teacher")
    with_acc = any(r["mean_acc"] is not None for r in results.values())  # --tasks '': perplexity only, one panel
    ratios = {n: _far_ratio(results, n) for n in results}
    with_long = any(r is not None for r in ratios.values())  # --long-windows: a panel beyond 1K
    n_panels = 1 + with_acc + with_long
    fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4), squeeze=False)
    ax1, ax2 = axes[0][0], (axes[0][1] if with_acc else None)
    ax3 = axes[0][n_panels - 1] if with_long else None
    for kind, color in (("distill", "tab:blue"), ("finetune", "tab:green")):
        pts = sorted((r["tokens"], r["ppl"], r["mean_acc"]) for n, r in results.items()
                     if r["kind"] == kind and not n.endswith(":final"))
        if pts:
            xs = [p[0] / 1e6 for p in pts]
            ax1.plot(xs, [p[1] for p in pts], "o-", color=color, label=kind)
            if ax2 is not None:
                ax2.plot(xs, [p[2] for p in pts], "o-", color=color, label=kind)
        far = sorted((r["tokens"], ratios[n]) for n, r in results.items()
                     if r["kind"] == kind and not n.endswith(":final") and ratios[n] is not None)
        if ax3 is not None and far:
            ax3.plot([p[0] / 1e6 for p in far], [p[1] for p in far], "o-", color=color, label=kind)
    if teacher:
        ax1.axhline(teacher["ppl"], color="k", ls="--", label="softmax teacher")
        ax1.axhline(1.05 * teacher["ppl"], color="k", ls=":", label="1.05 × teacher")
        if ax2 is not None:
            ax2.axhline(teacher["mean_acc"], color="k", ls="--", label="softmax teacher")
    ax1.set_xlabel("training tokens (M)")
    ax1.set_ylabel(f"held-out perplexity ({setup['ppl_tokens']} tokens)")
    ax1.set_yscale("log")
    if ax2 is not None:
        ax2.set_xlabel("training tokens (M)")
        ax2.set_ylabel(f"mean acc ({setup['tasks']}, n={setup['limit']})")
    if ax3 is not None:
        start = _far(teacher["long_context"])[0]
        ax3.axhline(1.0, color="k", ls="--", label="softmax teacher")
        ax3.set_xlabel("training tokens (M)")
        ax3.set_ylabel(f"perplexity at positions ≥ {start:,} (× teacher)")
        ax3.set_yscale("log")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
