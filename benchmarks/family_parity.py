"""Parity of every supported model family with transformers' own classes, as a table.

    python benchmarks/family_parity.py [--out benchmarks/results/model_families.md]

For each family a tiny random checkpoint is written by transformers itself (3 layers, hidden 64, 4 heads / 2 KV
heads, Mixtral: 4 experts top-2; norms perturbed, Qwen2 biases nonzero), converted with `convert.hf_to_flax`, and
compared: fp32 logits (T=37) on one device and on an 8-device mesh (fsdp 4 × tensor 2; Mixtral fsdp 2 × tensor 2
× expert 2), 12 greedy tokens against `generate`, and the bf16 round trip back to HF files byte for byte.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=500000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(use_sliding_window=False)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(use_sliding_window=False)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
}


def write(family: str, path: Path, dtype=torch.float32) -> Path:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.copy_(0.05 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    return path


def measure(family: str, root: Path) -> dict:
    from convert import flax_to_hf, hf_to_flax
    from lolcats_jax import compat
    from lolcats_jax.inference.generation import Generator
    from lolcats_jax.sharding import MeshShape, make_mesh

    d = write(family, root / family)
    tokens = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 37))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
        prompts = tokens[:, :7]
        greedy = ref_model.generate(torch.tensor(prompts), max_new_tokens=12, do_sample=False, pad_token_id=0,
                                    eos_token_id=None).numpy()[:, 7:]
    rel = lambda a: float(np.abs(a - ref).max() / np.abs(ref).max())  # noqa: E731
    one = hf_to_flax.load_hf_params(d, param_dtype="float32")
    out = {"family": family, "logits_1dev": rel(np.asarray(one(jax.numpy.asarray(tokens))))}
    shape = MeshShape(1, 2, 2, 2) if family == "mixtral" else MeshShape(1, 4, 2)
    mesh = make_mesh(shape)
    with compat.set_mesh(mesh):
        sharded = hf_to_flax.load_hf_params(d, mesh, param_dtype="float32")
        out["logits_mesh"] = rel(np.asarray(jax.jit(lambda t: sharded(t))(jax.numpy.asarray(tokens))))
    out["mesh"] = ",".join(f"{k}={v}" for k, v in zip(("data", "fsdp", "tensor", "expert"), shape.resolve(8)) if v > 1)
    out["greedy_equal"] = Generator(one).generate([list(p) for p in prompts], 12) == greedy.tolist()
    bf = write(family, root / f"{family}_bf16", torch.bfloat16)
    back = flax_to_hf.export_hf(hf_to_flax.load_hf_params(bf, param_dtype="bfloat16"), root / f"{family}_back")
    src = _tensors(bf.glob("*.safetensors"))
    out["round_trip_bytes_equal"] = bool(src) and src == _tensors(p for p in back if p.suffix == ".safetensors")
    return out


def _tensors(files) -> dict[str, tuple[str, bytes]]:
    """Every tensor of some safetensors files as (dtype, raw bytes)."""
    import safetensors

    merged = {}
    for f in files:
        with safetensors.safe_open(str(f), framework="pt") as g:
            for k in g.keys():
                t = g.get_tensor(k).contiguous()
                merged[k] = (str(t.dtype), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return merged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(f, Path(tmp)) for f in FAMILIES]
    lines = ["| family | logits max rel err, 1 device | on 8 devices | mesh | 12 greedy tokens = transformers | bf16 round trip |",
             "|---|---:|---:|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['logits_1dev']:.2e} | {r['logits_mesh']:.2e} | {r['mesh']} | "
                     f"{'yes' if r['greedy_equal'] else 'NO'} | {'bit-exact' if r['round_trip_bytes_equal'] else 'DIFFERS'} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    ok = all(r["greedy_equal"] and r["round_trip_bytes_equal"] and r["logits_1dev"] < 1e-5 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
