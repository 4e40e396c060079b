"""python -m lolcats_jax.rehearse --config configs/X.yaml [--layout PxD] [--out DIR] [--seed N] [--no-kill]

Prints the report (also written to DIR/report.md and DIR/report.json); exit code 1 when a check failed."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lolcats_jax.cli import run_main


def _layout(text: str) -> tuple[int, int]:
    p, sep, d = text.lower().partition("x")
    try:
        out = int(p), int(d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layout {text!r}: expected PROCESSESxDEVICES, e.g. 4x8") from None
    if not sep or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--layout {text!r}: expected PROCESSESxDEVICES with both ≥ 1, e.g. 4x8")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lolcats_jax.rehearse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a shipped config (configs/*.yaml)")
    ap.add_argument("--layout", type=_layout, default=None,
                    help="processes x devices per process (default: 8 devices per process for mesh.devices)")
    ap.add_argument("--out", default=None, help="rehearsal directory (default: a new temporary one)")
    ap.add_argument("--seed", type=int, default=0, help="weights, and which stage / process / moment the kill hits")
    ap.add_argument("--no-kill", action="store_true", help="run the cluster layout without killing anything")
    ap.add_argument("--block-workers", type=int, default=2, help="one-device distill_block jobs running at once")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers of the tiny model (default: the config's; fewer makes a quicker rehearsal of the "
                         "same mesh, stages, intervals and kill, e.g. the test suite's)")
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds one job may run before it is killed and the rehearsal fails (default 1800)")
    args = ap.parse_args(argv)
    if args.timeout <= 0:
        ap.error(f"--timeout {args.timeout}: expected a positive number of seconds")
    from lolcats_jax.config import load_config
    from lolcats_jax.rehearse.rehearsal import Rehearsal, RehearsalFailure, default_layout, format_report

    config = Path(args.config)
    processes, devices = args.layout or default_layout(load_config(config))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lolcats-rehearse-"))
    r = Rehearsal(config=config, out=out.absolute(), processes=processes, devices=devices, seed=args.seed,
                  kill=not args.no_kill, block_workers=args.block_workers, layers=args.layers,
                  timeout_s=args.timeout)
    try:
        report = r.run()
    except RehearsalFailure as e:
        print(f"[rehearse] FAILED: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"[rehearse] {out / 'report.md'}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
