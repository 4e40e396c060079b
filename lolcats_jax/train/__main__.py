"""python -m lolcats_jax.train --config configs/X.yaml [key.sub=value ...] [--stage NAME]"""

from __future__ import annotations

import argparse
import sys

from lolcats_jax.cli import run_main, setup_logging


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lolcats_jax.train", description="Run the LoLCATS recipe a config describes.")
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--stage", default=None, help="run only this stage (even if already finished)")
    ap.add_argument("--force-config", action="store_true",
                    help="re-run a run directory with a config that differs where its results depend on it")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.max_steps=10")
    args = ap.parse_intermixed_args(argv)  # overrides may follow --stage (e.g. `--stage distill_block block.index=3`)
    setup_logging()
    from lolcats_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    from lolcats_jax.distributed import maybe_initialize

    maybe_initialize(cfg.run)
    from lolcats_jax.train.runner import run

    run(cfg, args.config, only_stage=args.stage, force_config=args.force_config)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
