"""Paired A/B of the chunked attention's scan form in the recipe's real train steps: loop vs unrolled.

    python benchmarks/chunk_unroll_ab.py [--config configs/smollm2_demo.yaml] [--cells distill:256:10 ...]
        [--out benchmarks/results/train_chunk_unroll_ab_cpu]

Per cell (stage, T, reps) both steps are built in one process from the same weights (`lolcats_jax.bench.train`'s
`build_cell`), once with `kernels.lolcats.chunked.UNROLL_MAX_CHUNKS = 0` (every chunk scan a while loop) and once
with its default (16: scans of ≤ 16 chunks unrolled), and then timed alternately, step by step, so that both see the same
machine. Separate processes on this 2-core VM differ by up to ±10 % from run to run; alternating removes most of
that. Prints a markdown table and writes `<out>.md` / `<out>.json`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def _cell(text: str) -> tuple[str, int, int]:
    stage, T, reps = text.split(":")
    if stage not in ("distill", "finetune"):
        raise argparse.ArgumentTypeError(f"cell {text!r}: stage must be distill or finetune")
    return stage, int(T), int(reps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2_demo.yaml"))
    ap.add_argument("--cells", nargs="+", type=_cell,
                    default=[_cell(c) for c in ("distill:256:10", "distill:1024:5", "finetune:256:8", "finetune:1024:4")],
                    help="stage:T:reps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from kernels.lolcats import chunked
    from lolcats_jax.bench.output import write_table
    from lolcats_jax.bench.train import Cell, build_cell
    from lolcats_jax.config import load_config
    from lolcats_jax.sharding import make_mesh

    default_limit = chunked.UNROLL_MAX_CHUNKS
    forms = (("loop", 0), ("unrolled", default_limit))
    cfg = load_config(args.config)
    mesh = make_mesh(cfg.mesh.shape())
    cache: dict = {}
    rows = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    for stage, T, reps in args.cells:
        steps, row = {}, dict(stage=stage, T=T, reps=reps)
        for name, limit in forms:
            chunked.UNROLL_MAX_CHUNKS = limit  # read when the step is traced (inside build_cell)
            step, compile_s, _ = build_cell(cfg, cfg.model.path, mesh, Cell(stage, T, 1, 1), cache)
            row[f"{name}_loss"] = float(step()["loss"])  # warm run
            row[f"{name}_compile_s"] = round(compile_s, 2)
            steps[name] = step
        chunked.UNROLL_MAX_CHUNKS = default_limit
        times = {name: [] for name in steps}
        for _ in range(reps):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            row[f"{name}_median_s"] = round(statistics.median(ts), 4)
            row[f"{name}_min_s"] = round(min(ts), 4)
            row[f"{name}_tokens_per_s"] = round(T / statistics.median(ts), 1)
        row["speedup"] = round(row["loop_median_s"] / row["unrolled_median_s"], 3)
        rows.append(row)
        print(_row_md(row), flush=True)
    result = dict(config=args.config, unroll_max_chunks=default_limit, rows=rows, load_before=load_before,
                  load_after=[round(x, 2) for x in os.getloadavg()],
                  glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""), cpus=os.cpu_count())
    md = (f"Paired A/B, `{Path(args.config).name}`, batch 1, alternating steps in one process; load average before "
          f"{result['load_before']}, after {result['load_after']}; GLIBC_TUNABLES="
          f"{result['glibc_tunables'] or '(unset)'}.\n\n{HEADER}\n" + "\n".join(_row_md(r) for r in rows) + "\n")
    if args.out:
        write_table(result, md, args.out)
    print(md)
    return 0


HEADER = ("| stage | T | reps | loop: step s median (min) | tokens/s | unrolled: step s median (min) | tokens/s | "
          "speed-up | compile s loop → unrolled | same loss |\n|---|---|---|---|---|---|---|---|---|---|")


def _row_md(r: dict) -> str:
    return (f"| {r['stage']} | {r['T']} | {r['reps']} | {r['loop_median_s']} ({r['loop_min_s']}) | "
            f"{r['loop_tokens_per_s']} | {r['unrolled_median_s']} ({r['unrolled_min_s']}) | {r['unrolled_tokens_per_s']} | "
            f"**{r['speedup']}×** | {r['loop_compile_s']} → {r['unrolled_compile_s']} | "
            f"{r['loop_loss'] == r['unrolled_loss']} |")


if __name__ == "__main__":
    sys.exit(main())
