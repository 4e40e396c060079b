"""`python -m lolcats_jax.bench attention [--device cpu|gpu] [--out FILE] [--lengths ...]`: parse, run, write."""

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
    args = parser.parse_args(argv)
    if args.command == "attention":
        return _attention(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
