"""Benchmarks, each printing a markdown table (and writing it with JSON beside it under `--out`):

    python -m lolcats_jax.bench attention [--device cpu|gpu] [--out FILE] [--lengths ...]
    python -m lolcats_jax.bench generate --model RUN_DIR [--teacher HF_DIR] [--lengths ...] [--out FILE]
    python -m lolcats_jax.bench generate --model HF_DIR --linearize ...   (fresh feature maps: speed/memory only)
    python -m lolcats_jax.bench train --config configs/X.yaml [--model HF_DIR] [--stages ...] [--lengths ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax


def _attention(args: argparse.Namespace) -> int:
    from lolcats_jax.bench import attention

    device = args.device or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    if device != jax.default_backend():
        print(f"--device {device} requested but JAX runs on {jax.default_backend()!r}", file=sys.stderr)
        return 2
    defaults = attention.DEFAULTS[device]
    overrides = {k: getattr(args, k) for k in ("B", "H", "D", "F", "W", "dtype") if getattr(args, k) is not None}
    shapes = dataclasses.replace(defaults["shapes"], **overrides)
    result = attention.run(device, shapes, args.lengths or defaults["lengths"], args.reps or defaults["reps"],
                           args.budget_s or defaults["budget_s"], modes=tuple(args.modes), only=args.only,
                           max_seconds=args.max_seconds)
    print(attention.to_markdown(result))
    if args.out:
        attention.write(result, args.out)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lolcats_jax.bench import generate

    device = "gpu" if jax.default_backend() == "gpu" else "cpu"
    d = generate.DEFAULTS[device]
    settings = generate.Settings(lengths=tuple(args.lengths or d["lengths"]), batch=args.batch or d["batch"],
                                 decode_tokens=args.decode_tokens or d["decode_tokens"], reps=args.reps or d["reps"])
    dtype = args.dtype or ("bfloat16" if device == "gpu" else "float32")
    models = generate.load_models(args.model, args.teacher, dtype, args.linearize)
    result = generate.run(models, settings, max_seconds=args.max_seconds)
    result["config"].update(model=str(args.model), dtype=dtype)
    print(generate.to_markdown(result))
    if args.out:
        generate.write(result, args.out)
    return 0


def _train(args: argparse.Namespace) -> int:
    from lolcats_jax.bench import train
    from lolcats_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    device = "gpu" if jax.default_backend() == "gpu" else "cpu"
    d = train.DEFAULTS[device]
    cells = []
    for stage in args.stages:
        sec = cfg.distill if stage == "distill" else cfg.finetune
        for T in args.lengths or d["lengths"]:
            cells.append(train.Cell(stage, T, args.batch or sec.batch_size, args.accum or sec.optim.grad_accum))
    result = train.run(cfg, args.model or cfg.model.path, cells, args.reps or d["reps"], max_seconds=args.max_seconds)
    print(train.to_markdown(result))
    if args.out:
        train.write(result, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lolcats_jax.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attention", help="implementation × length × {fwd, fwd+bwd} timing table")
    p.add_argument("--device", choices=["cpu", "gpu"], help="default: gpu if JAX has one, else cpu")
    p.add_argument("--out", help="write FILE.md and FILE.json (FILE may end in .md)")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default per device)")
    p.add_argument("--reps", type=int, help="timed runs per cell (median reported)")
    p.add_argument("--budget-s", dest="budget_s", type=float,
                   help="per-cell time budget: fewer timed runs, and longer lengths skipped once predicted over it")
    p.add_argument("--max-seconds", dest="max_seconds", type=float,
                   help="stop starting new cells after this many seconds (remaining cells are listed as not run)")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--only", nargs="+", help="run only implementations whose name contains one of these")
    for name in ("B", "H", "D", "F", "W"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    g = sub.add_parser("generate", help="prefill/decode tokens/s and memory vs context: linearized vs softmax teacher")
    g.add_argument("--model", required=True, help="run directory (or an HF directory with --linearize)")
    g.add_argument("--teacher", help="softmax HF directory (default: the run's model.path)")
    g.add_argument("--linearize", action="store_true",
                   help="--model is an HF directory: linearize it with default attention options and fresh feature maps")
    g.add_argument("--lengths", type=int, nargs="+", help="context lengths (default: 256 1024 4096 on CPU, 1K-32K on GPU)")
    g.add_argument("--batch", type=int, help="prompts per batch")
    g.add_argument("--decode-tokens", dest="decode_tokens", type=int, help="decode steps timed per cell")
    g.add_argument("--reps", type=int, help="prefill runs per cell (median reported)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on GPU, float32 on CPU")
    g.add_argument("--max-seconds", dest="max_seconds", type=float, help="stop starting new cells after this long")
    g.add_argument("--out", help="write FILE.md and FILE.json (FILE may end in .md)")
    t = sub.add_parser("train", help="distill / finetune train-step tokens/s and compiled memory vs sequence length")
    t.add_argument("--config", required=True, help="recipe config (model options, loss, optimizer, mesh)")
    t.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    t.add_argument("--model", help="HF directory (default: the config's model.path)")
    t.add_argument("--stages", nargs="+", default=list(("distill", "finetune")), choices=["distill", "finetune"])
    t.add_argument("--lengths", type=int, nargs="+", help="sequence lengths T (default: 256 1024 on CPU)")
    t.add_argument("--batch", type=int, help="sequences per micro-batch (default: the stage's batch_size)")
    t.add_argument("--accum", type=int, help="micro-batches per step (default: the stage's grad_accum)")
    t.add_argument("--reps", type=int, help="timed steps per cell (median reported)")
    t.add_argument("--max-seconds", dest="max_seconds", type=float, help="stop starting new cells after this long")
    t.add_argument("--out", help="write FILE.md and FILE.json (FILE may end in .md)")
    args = parser.parse_args(argv)
    if args.command == "attention":
        return _attention(args)
    if args.command == "train":
        from lolcats_jax.cli import run_main

        return run_main(lambda _argv: _train(args), [])
    if args.command == "generate":
        from lolcats_jax.cli import run_main

        return run_main(lambda _argv: _generate(args), [])
    return 2


if __name__ == "__main__":
    sys.exit(main())
