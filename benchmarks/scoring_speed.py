"""Multiple-choice scoring speed: one row per request vs shared contexts (each document's context run once, its
choices continued from the caches), documents/s per task for the softmax teacher and a linearized model.

    python benchmarks/scoring_speed.py [--model HF_DIR] [--tasks piqa arc_easy hellaswag winogrande]
                                       [--limit 100] [--batch-size 8] [--out benchmarks/results/scoring_speed_cpu]

The linearized model is the HF model with every attention linearized and fresh feature maps (speed only: scores
are not quality figures). Each path scores every task twice; the second (warm: compiled programs reused) is the
documents/s reported, the first is shown as "cold" (compilation included). The two paths' log-likelihoods are
compared per request (max |Δ|) and their answers per document.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import lolcats_jax  # noqa: F401  (its XLA flags must be set before JAX starts)
    from convert.hf_to_flax import load_hf_params
    from lolcats_jax.bench.output import write_table
    from lolcats_jax.config import load_config
    from lolcats_jax.eval import tasks as T
    from lolcats_jax.eval.encoding import PairEncoder
    from lolcats_jax.eval.scoring import Scorer
    from lolcats_jax.model.build import model_options
    from lolcats_jax.tokenizer import load_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="artifacts/smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=["piqa", "arc_easy", "hellaswag", "winogrande"])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out")
    args = p.parse_args(argv)

    cfg = load_config("configs/smollm2_demo.yaml", [f"model.path={args.model}"])
    tok = load_tokenizer(args.model)
    from convert.hf_to_flax import read_config

    n_layers = read_config(args.model).num_layers
    cache: dict = {}
    models = {
        "softmax teacher": load_hf_params(args.model, param_dtype="float32", base_cache=cache,
                                          opts=model_options(cfg, n_layers, linearize=False)),
        "linearized": load_hf_params(args.model, param_dtype="float32", base_cache=cache,
                                     opts=model_options(cfg, n_layers, linearize=True)),
    }
    load = os.getloadavg()
    rows = []
    for task_name in args.tasks:
        task = T.load_task(task_name, limit=args.limit)
        pairs = [r for d in task.docs for r in d.requests]
        requests = PairEncoder(tok).encode_all(pairs)
        counts = [len(d.requests) for d in task.docs]
        for model_name, model in models.items():
            scorer = Scorer(model)
            got = {}
            for share in (False, True):
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    got[share] = scorer.loglikelihoods(requests, batch_size=args.batch_size, share_contexts=share)
                    times.append(time.perf_counter() - t0)
                rows.append(dict(task=task_name, model=model_name, path="shared contexts" if share else "row per request",
                                 docs=len(task.docs), requests=len(requests), cold_s=round(times[0], 2),
                                 warm_s=round(times[1], 2), docs_per_s=round(len(task.docs) / times[1], 2)))
                print(rows[-1], flush=True)
            a = np.array([x for x, _ in got[False]])
            b = np.array([x for x, _ in got[True]])
            splits = np.cumsum(counts)[:-1]
            same = sum(int(np.argmax(x) == np.argmax(y)) for x, y in zip(np.split(a, splits), np.split(b, splits)))
            rows[-1].update(max_abs_diff=float(np.max(np.abs(a - b))), same_answers=f"{same}/{len(task.docs)}")
    head = (f"Multiple-choice scoring on {os.cpu_count()} CPU cores, `{args.model}` fp32, batch size {args.batch_size}, "
            f"first {args.limit} documents per task; load average before {tuple(round(x, 2) for x in load)}, after "
            f"{tuple(round(x, 2) for x in os.getloadavg())}. docs/s from the warm run.\n\n"
            "| task | model | path | docs | requests | cold s | warm s | docs/s | shared vs rows: max abs Δ loglik, same answers |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    def cmp(r):
        return f"{r['max_abs_diff']:.1e}, {r['same_answers']}" if "max_abs_diff" in r else ""

    lines = [f"| {r['task']} | {r['model']} | {r['path']} | {r['docs']} | {r['requests']} | {r['cold_s']} | "
             f"{r['warm_s']} | {r['docs_per_s']} | {cmp(r)} |" for r in rows]
    md = head + "\n".join(lines) + "\n"
    print(md)
    if args.out:
        write_table({"rows": rows}, md, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
