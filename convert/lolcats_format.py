"""The original LoLCATS checkpoint layout (HazyResearch/lolcats; reference §8.1, §8.2, §8.4), both ways.

Keys (prefix P = `base_model.model.model.layers.{i}.self_attn.`, the PEFT-wrapped names of §8.4):

    P feature_map_q.mlp.layer / feature_map_k.mlp.layer   (H, D, F)      every linearized layer i
    P feature_map_q.mlp.bias  / feature_map_k.mlp.bias    (1, H, 1, 1)   only with per-head feature biases
    P window_factors                                      (1, H, 1, 1)   logits θ (γ = sigmoid θ)
    P {q,k,v,o}_proj.lora_A.default.weight                (r, in)        A, torch Linear layout
    P {q,k,v,o}_proj.lora_B.default.weight                (out, r)       B; update (α/r)·B A

Ours ↔ theirs (R = r, E hidden, H/K heads, D head dim): q A (E,R) ↔ (R,E); q B (R,H,D) ↔ (H·D,R); k/v B (R,K,D) ↔
(K·D,R); o A (H,D,R) ↔ (R,H·D); o B (R,E) ↔ (E,R). Only attention LoRA targets exist in that layout. The original
stores bf16; we write float32 unless asked otherwise (our θ and feature maps are float32 master weights).

Reading accepts the prefixes `model.`, `model.model.`, `base_model.model.model.` (or none), the main-branch alias
`window_factor`, PEFT names with or without the adapter name `default`, a `model_state_dict` wrapper, `.pt` files
(loaded with `torch.load(weights_only=True)`) and `.safetensors` files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from convert.errors import ConversionError
from lolcats_jax.model.llama_config import LlamaConfig

PREFIX = "base_model.model.model.layers."
CHECKPOINT_FILE = "lolcats_checkpoint.safetensors"
CONFIG_FILE = "lolcats_config.json"
ATTN_TARGETS = ("q", "k", "v", "o")
_KEY = re.compile(r"^(?:base_model\.model\.model\.|model\.model\.|model\.)?layers\.(\d+)\.(.+)$")
_LORA = re.compile(r"^self_attn\.([qkvo])_proj\.lora_([AB])(?:\.default)?\.weight$")
_IGNORED = ("self_attn.rotary_emb.inv_freq",)


def fmap_key(layer: int, which: str, part: str = "layer") -> str:
    return f"{PREFIX}{layer}.self_attn.feature_map_{which}.mlp.{part}"


def window_key(layer: int) -> str:
    return f"{PREFIX}{layer}.self_attn.window_factors"


def lora_key(layer: int, target: str, ab: str) -> str:
    return f"{PREFIX}{layer}.self_attn.{target}_proj.lora_{ab}.default.weight"


def lora_hf_shapes(cfg: LlamaConfig, rank: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """target → (A shape (r, in), B shape (out, r)) in the torch Linear layout."""
    E, HD, KD = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q": ((rank, E), (HD, rank)), "k": ((rank, E), (KD, rank)), "v": ((rank, E), (KD, rank)),
            "o": ((rank, HD), (E, rank))}


# ------------------------------------------------------------------------------------------------------ writing


def lolcats_tensors(model, dtype: np.dtype | None = None) -> dict[str, np.ndarray]:
    """Every tensor of `model`'s linearization (feature maps, window factors, attention LoRA) in the original layout."""
    from convert.flax_to_hf import _to_host

    dtype = np.dtype(dtype if dtype is not None else np.float32)
    lora = model.opts.lora
    if lora is not None:
        bad = [t for t in lora.targets if t not in ATTN_TARGETS]
        if bad:
            raise ConversionError(f"LoRA targets {bad} cannot be written in the LoLCATS layout, which only has adapters "
                                  f"on the attention projections {list(ATTN_TARGETS)}; export with --format hf instead")
    H = model.cfg.num_heads
    out: dict[str, np.ndarray] = {}
    host = lambda name: _to_host(getattr(model.lolcats, name)[...]).astype(np.float32)  # noqa: E731
    if model.lin_layers:
        fq, fk, theta = host("fmap_q"), host("fmap_k"), host("window_logit")
        bq = host("fbias_q") if hasattr(model.lolcats, "fbias_q") else None
        bk = host("fbias_k") if hasattr(model.lolcats, "fbias_k") else None
        for n, layer in enumerate(model.lin_layers):
            out[fmap_key(layer, "q")], out[fmap_key(layer, "k")] = fq[n], fk[n]
            if bq is not None:
                out[fmap_key(layer, "q", "bias")] = bq[n].reshape(1, H, 1, 1)
                out[fmap_key(layer, "k", "bias")] = bk[n].reshape(1, H, 1, 1)
            out[window_key(layer)] = theta[n].reshape(1, H, 1, 1)
    if lora is not None:
        for t in lora.targets:
            a_all = _to_host(getattr(model.lora, f"{t}_a")[...]).astype(np.float32)
            b_all = _to_host(getattr(model.lora, f"{t}_b")[...]).astype(np.float32)
            for layer in range(model.cfg.num_layers):
                out[lora_key(layer, t, "A")] = a_all[layer].reshape(-1, lora.rank).T
                out[lora_key(layer, t, "B")] = b_all[layer].reshape(lora.rank, -1).T
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in out.items()}


def describe(model) -> dict:
    """lolcats_config.json: what the checkpoint needs besides its tensors to be rebuilt."""
    lo, lora = model.opts.lolcats, model.opts.lora
    return {
        "format": "lolcats (HazyResearch/lolcats PEFT-wrapped key layout)",
        "attention": {"form": lo.form, "window": lo.window, "window_size": lo.window_size,
                      "feature_map": lo.feature_map, "fullspace": lo.fullspace, "feature_dim": lo.feature_dim,
                      "feature_bias": lo.feature_bias, "eps": lo.eps, "affine": lo.affine, "compat": lo.compat,
                      "softmax_layers": [i for i, k in enumerate(model.kinds) if k == "softmax"]},
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
    }


def write_lolcats_checkpoint(model, out_dir: Path, dtype: np.dtype | None = None) -> list[Path]:
    """Writes CHECKPOINT_FILE and CONFIG_FILE into `out_dir` (atomically each); returns their paths."""
    from convert.safetensors_io import save_file
    from lolcats_jax.fsio import write_bytes_atomic

    tensors = lolcats_tensors(model, dtype)
    if not tensors:
        raise ConversionError("the model has neither linearized layers nor LoRA adapters: nothing to write")
    ckpt = out_dir / CHECKPOINT_FILE
    save_file(tensors, ckpt)
    written = [ckpt]
    write_bytes_atomic(out_dir / CONFIG_FILE, (json.dumps(describe(model), indent=2) + "\n").encode())
    return written + [out_dir / CONFIG_FILE]


# ------------------------------------------------------------------------------------------------------ reading


def read_checkpoint_file(path: str | Path) -> dict[str, np.ndarray]:
    """name → float32 array of a `.pt` (torch.load, weights only) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from convert.safetensors_io import SafetensorsFile

        with SafetensorsFile(path) as f:
            return {k: f.read(k).astype(np.float32) for k in f.keys()}
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ConversionError(f"{path}: cannot be read by torch.load(weights_only=True) ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("model_state_dict"), dict):
        sd = sd["model_state_dict"]
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: expected a state dict (optionally under 'model_state_dict'), got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().to(torch.float32).numpy()
    return out


@dataclasses.dataclass
class ParsedCheckpoint:
    """A LoLCATS checkpoint in our layout (numpy float32). Linearized layers are those with feature maps."""

    lin_layers: tuple[int, ...]
    fmap_q: np.ndarray | None  # (N, H, D, F)
    fmap_k: np.ndarray | None
    fbias_q: np.ndarray | None  # (N, H)
    fbias_k: np.ndarray | None
    window_logit: np.ndarray | None  # (N, H)
    rank: int | None
    lora: dict[str, np.ndarray]  # "q_a" (L, E, R), "q_b" (L, R, H, D), ... for the targets present

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(t for t in ATTN_TARGETS if f"{t}_a" in self.lora)


def _split(tensors: dict[str, np.ndarray], where: str) -> dict[int, dict[str, tuple[str, np.ndarray]]]:
    """layer → {suffix: (original key, array)}, with key prefixes and aliases resolved."""
    per_layer: dict[int, dict[str, tuple[str, np.ndarray]]] = {}
    for key, arr in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ConversionError(f"{where}: unexpected key {key!r} (expected ...layers.<i>.self_attn.<...>)")
        layer, suffix = int(m.group(1)), m.group(2)
        if suffix in _IGNORED:
            continue
        if suffix == "self_attn.window_factor":  # main-branch alias of window_factors
            suffix = "self_attn.window_factors"
        if ".lora_" in suffix and not _LORA.match(suffix):
            raise ConversionError(f"{where}: {key!r} is a LoRA adapter on an unsupported target; only the attention "
                                  f"projections {[t + '_proj' for t in ATTN_TARGETS]} can be imported")
        slot = per_layer.setdefault(layer, {})
        if suffix in slot:
            if not np.array_equal(slot[suffix][1], arr):
                raise ConversionError(f"{where}: {key!r} and {slot[suffix][0]!r} name the same tensor with different values")
            continue
        slot[suffix] = (key, arr)
    return per_layer


def _take(slot: dict, suffix: str, layer: int, shape: tuple[int, ...], where: str, reshape=None) -> np.ndarray:
    if suffix not in slot:
        raise ConversionError(f"{where}: missing key layers.{layer}.{suffix}")
    key, arr = slot.pop(suffix)
    ok = arr.shape == shape or (reshape is not None and arr.size == int(np.prod(shape)) and arr.shape == reshape)
    if not ok:
        raise ConversionError(f"{where}: {key!r} has shape {list(arr.shape)}, expected {list(reshape or shape)}")
    return arr.reshape(shape)


def parse_checkpoint(tensors: dict[str, np.ndarray], cfg: LlamaConfig, where: str = "checkpoint") -> ParsedCheckpoint:
    """Checks every key and shape against `cfg` and converts to our layout; errors name the offending key."""
    L, H, D, E = cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.hidden_size
    per_layer = _split(tensors, where)
    out_of_range = sorted(i for i in per_layer if not 0 <= i < L)
    if out_of_range:
        raise ConversionError(f"{where}: keys for layer {out_of_range[0]}, but the base model has layers 0..{L - 1}")
    lin = tuple(sorted(i for i, s in per_layer.items() if any(k.startswith("self_attn.feature_map_") for k in s)))
    fq, fk, bq, bk, theta = [], [], [], [], []
    F = next((a.shape[-1] for i in lin for k, (_, a) in per_layer[i].items()
              if k.endswith(".mlp.layer") and a.ndim == 3), 0)  # the learned feature dim, from the first map
    for i in lin:
        slot = per_layer[i]
        fq.append(_take(slot, "self_attn.feature_map_q.mlp.layer", i, (H, D, F), where))
        fk.append(_take(slot, "self_attn.feature_map_k.mlp.layer", i, (H, D, F), where))
        theta.append(_take(slot, "self_attn.window_factors", i, (H,), where, reshape=(1, H, 1, 1)))
        has_bias = "self_attn.feature_map_q.mlp.bias" in slot or "self_attn.feature_map_k.mlp.bias" in slot
        if has_bias or bq:
            bq.append(_take(slot, "self_attn.feature_map_q.mlp.bias", i, (H,), where, reshape=(1, H, 1, 1)))
            bk.append(_take(slot, "self_attn.feature_map_k.mlp.bias", i, (H,), where, reshape=(1, H, 1, 1)))
    if bq and len(bq) != len(lin):
        raise ConversionError(f"{where}: feature-map biases are present for some linearized layers but not all")
    rank = None
    for i in sorted(per_layer):
        for suffix, (key, arr) in per_layer[i].items():
            m = _LORA.match(suffix)
            if m is None:
                raise ConversionError(f"{where}: unexpected key {key!r}")
            if m.group(2) == "A" and arr.ndim == 2:
                rank = rank or arr.shape[0]
    lora: dict[str, np.ndarray] = {}
    if rank is not None:
        shapes = lora_hf_shapes(cfg, rank)
        for t in ATTN_TARGETS:
            layers = [i for i in per_layer if f"self_attn.{t}_proj.lora_A.weight" in _norm(per_layer[i])
                      or f"self_attn.{t}_proj.lora_B.weight" in _norm(per_layer[i])]
            if not layers:
                continue
            a_shape, b_shape = shapes[t]
            a_all, b_all = np.zeros((L, *a_shape[::-1]), np.float32), np.zeros((L, *b_shape[::-1]), np.float32)
            for i in layers:
                slot = _norm(per_layer[i])
                a_all[i] = _take(slot, f"self_attn.{t}_proj.lora_A.weight", i, a_shape, where).T
                b_all[i] = _take(slot, f"self_attn.{t}_proj.lora_B.weight", i, b_shape, where).T
            K = cfg.num_kv_heads
            if t == "o":
                lora["o_a"], lora["o_b"] = a_all.reshape(L, H, D, rank), b_all
            else:
                lora[f"{t}_a"], lora[f"{t}_b"] = a_all, b_all.reshape(L, rank, H if t == "q" else K, D)
    stack = lambda xs: np.stack(xs).astype(np.float32) if xs else None  # noqa: E731
    return ParsedCheckpoint(lin, stack(fq), stack(fk), stack(bq), stack(bk), stack(theta), rank, lora)


def _norm(slot: dict) -> dict:
    """LoRA suffixes without the adapter name (`lora_A.default.weight` → `lora_A.weight`), same entries."""
    return {re.sub(r"\.default\.weight$", ".weight", k): v for k, v in slot.items()}
