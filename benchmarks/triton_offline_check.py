"""Check the GPU kernels further than a lowering can, on a machine WITHOUT a GPU.

Step `dump` (project environment, jax): lower the Pallas kernels (forward + backward, hybrid tk/sw and linear) for
CUDA at Llama sizes (B=1, H=32, T=8192, D=128, F=64, W=64, bf16), with K=32 kv heads and with K=8 (grouped-query,
Llama-3.1-8B; those modules carry the suffix `_K8`), save each kernel's Triton IR (TTIR text) with its num_warps /
num_stages, and save small test cases (inputs + Pallas-interpret outputs, some grouped-query) for the Triton
kernel.
Step `compile` (an environment with triton 3.6, torch CPU and numpy < 2.3; no jax needed):
  - compile every TTIR to PTX for sm_90 and run ptxas: fails on compile errors and on shared memory above an
    H100/H200 block's 227 KiB; reports registers and spills;
  - compile the hand-written Triton kernel (triton_hybrid_kernel.py) the same way (KH = 32 and KH = 8 kv heads);
  - run the hand-written kernel in the Triton interpreter (TRITON_INTERPRET=1) on the saved cases and compare with
    the Pallas outputs (y, c, den).
`all` runs both: python benchmarks/triton_offline_check.py all --triton-python /path/to/triton-env/bin/python
(make that environment with: python -m venv E && E/bin/pip install triton==3.6.0 torch==2.13.0 "numpy<2.3").
XLA compiles the TTIR with the Triton bundled in jaxlib, not triton 3.6: this is a close proxy, not a guarantee.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90
HEADS, KV_HEADS = 32, (32, 8)  # H query heads; K kv heads: multi-head, and grouped-query as Llama-3.1-8B
HAND_WARPS = int(os.environ.get("LOLCATS_HAND_WARPS", "8"))  # the hand-written kernel's warps: PallasConfig.num_warps_fwd


def _kv_tag(K: int) -> str:
    """Suffix of the kernels' names for K kv heads: none for K = H, `_K8` for grouped-query K = 8."""
    return "" if K == HEADS else f"_K{K}"


def parse_config(text: str) -> dict:
    """"fwd=8,bwd=8,bv=32,stages=1" → PallasConfig keyword arguments (any subset; the rest stay default)."""
    names = {"fwd": "num_warps_fwd", "bwd": "num_warps_bwd", "bv": "block_v", "stages": "num_stages", "seg": "seg_chunks"}
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in names or not value.isdigit():
            raise SystemExit(f"--configs: {part!r} is not one of {sorted(names)}=N")
        out[names[key]] = int(value)
    return out


def _config_tag(kw: dict) -> str:
    """Suffix of the kernels' names for a non-default launch config (none for the defaults)."""
    short = {"num_warps_fwd": "fwd", "num_warps_bwd": "bwd", "block_v": "bv", "num_stages": "st", "seg_chunks": "seg"}
    return "".join(f"_{short[k]}{v}" for k, v in sorted(kw.items()))


def dump(out: str, configs: list[dict] | None = None) -> None:
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "kernels")]
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.pallas.triton import pallas_call_registration as reg

    from kernels.lolcats import FeatureMapParams, LolcatsSpec
    from kernels.lolcats.pallas_hybrid import PallasConfig, make_layout, pallas_lolcats_attention, prepare_inputs
    from kernels.lolcats.pallas_hybrid_fwd import forward_call
    from kernels.lolcats.pallas_tiles import softmax_scale
    from lolcats_jax import compat
    from lolcats_testutil import make_inputs

    modules = []
    lower = reg.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = capture
    os.makedirs(out, exist_ok=True)
    B, T, H, D, F = 1, 8192, HEADS, 128, 64
    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((H, D, F), jnp.float32)
    fmap, theta = FeatureMapParams(w, w, None, None), jax.ShapeDtypeStruct((H,), jnp.float32)
    manifest = []
    for cfg_kw, K in itertools.product(configs or [{}], KV_HEADS):
        kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16)
        pcfg = PallasConfig(interpret=False, **cfg_kw)
        for kw in (dict(window="tk"), dict(window="sw"), dict(form="linear")):
            spec = LolcatsSpec(window_size=64, **kw)

            def loss(q, k, v, fmap, theta, spec=spec, pcfg=pcfg):
                y = pallas_lolcats_attention(q, k, v, fmap, theta, spec, pcfg)
                return jnp.sum(y.astype(jnp.float32))

            modules.clear()
            text = compat.lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), x, kv, kv, fmap, theta)
            params = {m.group(1): (int(m.group(3)), int(m.group(2))) for m in re.finditer(
                r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)}
            for asm in modules:
                module = re.search(r"module @(\S+)", asm).group(1)
                name = module + _kv_tag(K) + _config_tag(cfg_kw)
                path = os.path.join(out, f"{name}.ttir")
                with open(path, "w") as f:
                    f.write(asm)
                warps, stages = params.get(module, (4, 1))
                manifest.append(dict(path=path, name=name, num_warps=warps, num_stages=stages))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"{len(manifest)} Triton modules → {out}")

    cases = [  # (spec kwargs, chunk, chunks per segment, T, D, H, K)
        (dict(window="tk", window_size=16), None, 2, 100, 16, 2, 2),
        (dict(window="sw", window_size=16), 16, 2, 100, 32, 2, 2),
        (dict(form="linear", window_size=16), 16, 1, 50, 16, 2, 2),
        (dict(window="sw", window_size=16), 32, 1, 77, 16, 2, 2),
        (dict(window="tk", window_size=16), 16, 2, 70, 16, 4, 2),  # grouped-query: 2 query heads per kv head
        (dict(form="linear", window_size=16), 16, 2, 50, 16, 4, 1),  # one kv head for 4 query heads
    ]
    for idx, (kw, chunk, seg, T, D, H, K) in enumerate(cases):
        spec = LolcatsSpec(**kw)
        q, k, v, fm, th = make_inputs(idx, 2, T, H, D, 16, bias=True, K=K)
        lay = make_layout(spec, T, D, D, 16, PallasConfig(chunk=chunk, seg_chunks=seg, block_v=16), True)
        qp, kp, vp, hs = prepare_inputs(q, k, v, fm, th, spec, lay)
        y, c, den, S0, z0 = forward_call(qp, kp, vp, fm.wq, fm.wk, hs, lay, True)
        meta = dict(T=T, TP=qp.shape[1], H=H, KH=K, D=D, DV=D, F=16, P=lay.num_parts, C=lay.chunk, BV=lay.block_v,
                    N=lay.num_chunks, G=lay.seg_chunks, NS=lay.num_segments, W=lay.window_size,
                    HAS_WINDOW=lay.has_window, TK=lay.window == "tk", LIN_CUR=lay.linear_in("cur"),
                    LIN_PREV=lay.has_window and lay.linear_in("prev"), FM_EPS=lay.fm_eps, DEN_EPS=lay.den_eps,
                    SCALE=softmax_scale(D), IEEE=True)
        arrays = dict(q=qp, k=kp, v=vp, wq=fm.wq, wk=fm.wk, hs=hs, S0=S0, z0=z0, y=y, c=c, den=den)
        np.savez(os.path.join(out, f"case{idx}.npz"), meta=json.dumps(meta),
                 **{n: np.asarray(a) for n, a in arrays.items()})
    print(f"{len(cases)} Triton-kernel cases → {out}")


def _ptxas(triton, ptx: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return " ".join(line.split("info    :")[-1].strip() for line in res.stderr.splitlines()
                    if "registers" in line or "spill" in line)


def compile_all(out: str) -> bool:
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target, ok = GPUTarget("cuda", 90, 32), True
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    for m in manifest:
        try:
            k = triton.compile(m["path"], target=target,
                               options=dict(num_warps=m["num_warps"], num_stages=m["num_stages"]))
            fits = k.metadata.shared <= SHARED_LIMIT
            ok &= fits
            print(f"{'ok  ' if fits else 'FAIL'} {m['name']} warps={m['num_warps']} stages={m['num_stages']} "
                  f"shared={k.metadata.shared} | {_ptxas(triton, k.asm['ptx'])}")
        except Exception as err:  # noqa: BLE001 - report every kernel
            ok = False
            print(f"FAIL {m['name']}: {type(err).__name__}: {str(err)[:1500]}")

    spec = importlib.util.spec_from_file_location("tk", os.path.join(ROOT, "kernels/lolcats/triton_hybrid_kernel.py"))
    tk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tk)
    fn = tk.lolcats_fwd_kernel
    for (form, window), KH in itertools.product((("hybrid", "tk"), ("hybrid", "sw"), ("linear", "tk")), KV_HEADS):
        has_w, C, W, T = form == "hybrid", 64, 64, 8192
        const = dict(T=T, TP=T, H=HEADS, KH=KH, D=128, DV=128, F=64, P=2, C=C, BV=64, N=T // C, G=16,
                     NS=T // C // 16, W=W, HAS_WINDOW=has_w, TK=window == "tk", LIN_CUR=not has_w, LIN_PREV=has_w and window == "sw",
                     FM_EPS=1e-12, DEN_EPS=0.0 if has_w else 1e-12, SCALE=128**-0.5, IEEE=False)
        types = ["bf16", "bf16", "bf16", "fp32", "fp32", "fp32", "fp32", "fp32", "bf16", "fp32", "fp32"]
        sig = {**dict(zip(fn.arg_names[:11], ["*" + t for t in types])), **{n: "constexpr" for n in const}}
        try:
            k = triton.compile(ASTSource(fn, sig, const), target=target, options=dict(num_warps=HAND_WARPS, num_stages=1))
            fits = k.metadata.shared <= SHARED_LIMIT
            ok &= fits
            print(f"{'ok  ' if fits else 'FAIL'} triton_hybrid_kernel {form}-{window}{_kv_tag(KH)} "
                  f"shared={k.metadata.shared} | {_ptxas(triton, k.asm['ptx'])}")
        except Exception as err:  # noqa: BLE001
            ok = False
            print(f"FAIL triton_hybrid_kernel {form}-{window}{_kv_tag(KH)}: {type(err).__name__}: {str(err)[:1500]}")
    return ok


def interpret_cases(out: str) -> bool:
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("tki", os.path.join(ROOT, "kernels/lolcats/triton_hybrid_kernel.py"))
    tk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tk)
    ok = True
    for path in sorted(glob.glob(os.path.join(out, "case*.npz"))):
        z = np.load(path)
        meta = json.loads(str(z["meta"]))
        t = {n: torch.from_numpy(np.asarray(z[n])) for n in ("q", "k", "v", "wq", "wk", "hs", "S0", "z0")}
        B, H, TP, T = t["q"].shape[0], meta["H"], meta["TP"], meta["T"]
        y, c, den = torch.empty(B, TP, H, meta["DV"]), torch.zeros(B, H, TP), torch.zeros(B, H, TP)
        tk.lolcats_fwd_kernel[(B * H, meta["DV"] // meta["BV"], meta["NS"])](
            *(t[n] for n in ("q", "k", "v", "wq", "wk", "hs", "S0", "z0")), y, c, den, **meta)
        errs = {}
        for name, got in (("y", y.numpy()[:, :T]), ("c", c.numpy()[..., :T]), ("den", den.numpy()[..., :T])):
            want = z[name][:, :T] if name == "y" else z[name][..., :T]
            errs[name] = float(np.sqrt(np.mean((got - want) ** 2)) / max(np.sqrt(np.mean(want**2)), 1e-30))
        if not meta["HAS_WINDOW"]:
            errs.pop("c")
        passed = max(errs.values()) < 1e-5
        ok &= passed
        print(f"{'ok  ' if passed else 'FAIL'} interpreter {os.path.basename(path)} {errs}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["dump", "compile", "all"])
    parser.add_argument("--dir", default="/tmp/lolcats_triton_check")
    parser.add_argument("--triton-python", help="python of the triton environment (step all)")
    parser.add_argument("--configs", nargs="*", default=None, metavar="fwd=8,bwd=8,bv=32,stages=1",
                        help="dump the kernels under these launch configs too (a sweep of registers / spills); "
                             "'' = the defaults")
    args = parser.parse_args(argv)
    if args.step in ("dump", "all"):
        dump(args.dir, [parse_config(c) for c in args.configs] if args.configs is not None else None)
    if args.step == "all":
        python = args.triton_python or sys.executable
        return subprocess.call([python, os.path.abspath(__file__), "compile", "--dir", args.dir])
    if args.step == "compile":
        ok = compile_all(args.dir)
        # the interpreter must be chosen before triton is imported: run it in a fresh process
        ok &= subprocess.call([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r});"
                               f"import triton_offline_check as t; sys.exit(0 if t.interpret_cases({args.dir!r})"
                               " else 1)"]) == 0
        print("ALL OK" if ok else "SOME CHECKS FAILED")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
