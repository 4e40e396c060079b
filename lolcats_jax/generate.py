"""Generate text from the command line.

    python -m lolcats_jax.generate --model PATH --prompt TEXT [--prompt TEXT ...] [--chat]
        [--max-new-tokens N] [--temperature T --top-p P --seed S] [--dtype float32|bfloat16]

PATH is a Hugging Face directory (a softmax model) or a run directory of `python -m lolcats_jax.train`.
One prompt streams its tokens to the terminal; several are generated as one left-padded batch.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from lolcats_jax.cli import run_main, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lolcats_jax.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory or lolcats_jax run directory")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    ap.add_argument("--chat", action="store_true", help="render the prompt with the tokenizer's chat template")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                    help="prefill long prompts N tokens at a time (bounded memory; same output for default-mode models)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mesh", default=None, metavar="data=1,fsdp=-1,tensor=1",
                    help="shard the model over this device mesh (-1 = the remaining devices); default one device")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from lolcats_jax.inference.loading import cli_mesh, mesh_scope

    mesh = cli_mesh(args.mesh)
    with mesh_scope(mesh):
        return _generate(args, mesh)


def _generate(args: argparse.Namespace, mesh) -> int:
    from lolcats_jax.inference.generation import Generator, SamplingConfig
    from lolcats_jax.inference.loading import load_for_generation
    from lolcats_jax.tokenizer import encode_prompt, eos_ids

    t0 = time.perf_counter()
    where = f" on mesh {dict(mesh.shape)}" if mesh is not None else ""
    print(f"[generate] loading {args.model} ({args.dtype}{where}) …", file=sys.stderr, flush=True)
    model, tokenizer = load_for_generation(args.model, dtype=args.dtype, mesh=mesh)
    t_load = time.perf_counter() - t0
    print(f"[generate] loaded in {t_load:.1f}s; compiling prefill and decode (the first tokens wait for it) …",
          file=sys.stderr, flush=True)
    prompts = [encode_prompt(tokenizer, p, chat=args.chat) for p in args.prompt]
    gen = Generator(model)
    stream = len(prompts) == 1
    printed: list[int] = []

    def on_token(tokens: np.ndarray, active: np.ndarray) -> None:
        if not stream or not active[0]:
            return
        before = tokenizer.decode(printed, skip_special_tokens=True)
        printed.append(int(tokens[0]))
        after = tokenizer.decode(printed, skip_special_tokens=True)
        sys.stdout.write(after[len(before):])
        sys.stdout.flush()

    if stream:
        sys.stdout.write(args.prompt[0])
    t1 = time.perf_counter()
    out = gen.generate(
        prompts,
        args.max_new_tokens,
        sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
        eos_ids=eos_ids(tokenizer, model.cfg.eos_token_id),
        on_token=on_token,
        prefill_chunk=args.prefill_chunk,
    )
    dt = time.perf_counter() - t1
    if stream:
        sys.stdout.write("\n")
    else:
        for p, o in zip(args.prompt, out):
            print(f"--- {p}\n{p}{tokenizer.decode(o, skip_special_tokens=True)}")
    n = sum(len(o) for o in out)
    print(f"[generate] load {t_load:.1f}s, {n} new tokens in {dt:.1f}s (incl. compilation)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
