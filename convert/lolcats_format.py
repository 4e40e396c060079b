"""The original LoLCATS checkpoint layout (HazyResearch/lolcats; reference §5.1, §8.1, §8.2, §8.4, §8.6), both ways.

Keys (prefix P = `base_model.model.model.layers.{i}.self_attn.`, the PEFT-wrapped names of §8.4):

    P feature_map_q.mlp.layer / feature_map_k.mlp.layer   (H, D, F)      every linearized layer i
    P feature_map_q.mlp.bias  / feature_map_k.mlp.bias    (1, H, 1, 1)   only with per-head feature biases
    P window_factors                                      (1, H, 1, 1)   logits θ (γ = sigmoid θ)
    P {q,k,v,o}_proj.lora_A.default.weight                (r, in)        A, torch Linear layout
    P {q,k,v,o}_proj.lora_B.default.weight                (out, r)       B; update (α/r)·B A

Ours ↔ theirs (R = r, E hidden, H/K heads, D head dim): q A (E,R) ↔ (R,E); q B (R,H,D) ↔ (H·D,R); k/v B (R,K,D) ↔
(K·D,R); o A (H,D,R) ↔ (R,H·D); o B (R,E) ↔ (E,R). Only attention LoRA targets exist in that layout.

Writing (`write_lolcats_checkpoint`) produces what the original's own loaders take: `{name}_distill.pt` with the
attention parameters under `model.layers.{i}.self_attn.…` (its `--load_distill_checkpoint` path loads them into the
converted model before LoRA is attached, `strict=False`, so PEFT names would all be "unexpected"), `{name}_ft.pt`
with the adapters under the PEFT names above, both as `torch.save({"model_state_dict": …})` of tensors only (bf16 by
default, as the original stores them), and model / finetune YAML stubs with the attention and LoRA settings.

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

DISTILL_SUFFIX, FT_SUFFIX = "_distill.pt", "_ft.pt"
MODEL_YAML, FINETUNE_YAML = "model_config.yaml", "finetune_config.yaml"
DISTILL_PREFIX = "model.layers."  # named_parameters() of the converted, not yet PEFT-wrapped model (§5.1, §8.1)
_ATTENTION_TYPES = {("hybrid", "tk"): "lolcats_llama_window_tk", ("hybrid", "sw"): "lolcats_llama_window_sw"}


def noncompat_reason(model) -> str | None:
    """Why the original code would evaluate `model` differently (None when it would not).

    Only hybrid tk layers differ: our default masks are start-aligned (blocks from position 0) and decode exactly,
    the original aligns the terraced blocks to the end of each call and decodes with a sliding window (§3.4, §3.8).
    sw windows and the linear form are the same math in both."""
    lo = model.opts.lolcats
    if not model.lin_layers or lo.compat or lo.form != "hybrid" or lo.window != "tk":
        return None
    return ("this model was trained with attention.compat: false (terraced blocks aligned to position 0, exact "
            "decoding); the original code aligns the blocks to the end of each call and decodes with a sliding "
            "window, so it would evaluate these weights differently")


def lolcats_tensors(model, dtype: np.dtype | None = None) -> dict[str, np.ndarray]:
    """Every tensor of `model`'s linearization (feature maps, window factors, attention LoRA) under the PEFT-wrapped
    names of the original (prefix PREFIX), float32 unless `dtype` says otherwise."""
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


def split_for_original(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(distill, ft) state dicts as the original's two loaders expect them: the distill checkpoint is loaded into the
    converted model before LoRA is attached (keys `model.layers.…`), the ft checkpoint into the PEFT-wrapped model
    (keys `base_model.model.model.layers.….lora_{A,B}.default.weight`)."""
    distill = {DISTILL_PREFIX + k[len(PREFIX):]: v for k, v in tensors.items() if ".lora_" not in k}
    ft = {k: v for k, v in tensors.items() if ".lora_" in k}
    return distill, ft


def model_yaml(model, base_path: str | None, dtype_name: str) -> dict:
    """A model YAML (reference §8.6) with the attention settings of `model`, for the original's scripts."""
    lo, cfg = model.opts.lolcats, model.cfg
    if lo.form == "linear":
        attention_type = "lolcats_llama"
    else:
        attention_type = _ATTENTION_TYPES.get((lo.form, lo.window))
    if attention_type is None:
        raise ConversionError(f"attention form={lo.form!r} window={lo.window!r} has no attention_type in the original code")
    hf = cfg.to_hf_dict()
    model_section = {"pretrained_model_name_or_path": base_path or "<path of the base Llama>", "return_dict": True,
                     "load_in_8bit": False, "load_in_4bit": False, "device_map": "auto", "low_cpu_mem_usage": True,
                     "torch_dtype": dtype_name, "attn_implementation": "eager", "rope_theta": float(cfg.rope_theta)}
    if hf.get("rope_scaling"):
        model_section["rope_scaling"] = hf["rope_scaling"]
    attention = {"attention_type": attention_type, "state_chunk_len": 1024, "window_size": int(lo.window_size),
                 "affine_attention_factors": bool(lo.affine), "init_window_factor": -2.1972245773362196,
                 "feature_map": lo.feature_map, "feature_map_kwargs": {"eps": float(lo.eps), "fullspace": bool(lo.fullspace)},
                 "layer_idx": None, "learned_kernel": "untied_head_einsum",
                 "learned_kernel_kwargs": {"feature_dim": int(lo.feature_dim), "skip_connection": False,
                                           "bias": bool(lo.feature_bias), "zero_init": False},
                 "tie_qk_kernels": False, "train_qk": False}
    softmax = [i for i, k in enumerate(model.kinds) if k == "softmax"]
    if softmax:
        attention["softmax_attentions"] = softmax
    return {"name": "llama", "model": model_section, "attention": attention}


def finetune_yaml(model) -> dict:
    """The `finetune` block of an experiment YAML (reference §5.2) with `model`'s LoRA settings."""
    lora = model.opts.lora
    return {"finetune": {"method": "lora", "kwargs": {
        "r": int(lora.rank), "lora_alpha": float(lora.alpha), "lora_dropout": float(getattr(lora, "dropout", 0.0)),
        "target_modules": [f"{t}_proj" for t in lora.targets]}}}


def describe(model) -> dict:
    """lolcats_config.json: what the checkpoint needs besides its tensors to be rebuilt."""
    lo, lora = model.opts.lolcats, model.opts.lora
    return {
        "format": "lolcats (HazyResearch/lolcats torch.save state dicts)",
        "attention": {"form": lo.form, "window": lo.window, "window_size": lo.window_size,
                      "feature_map": lo.feature_map, "fullspace": lo.fullspace, "feature_dim": lo.feature_dim,
                      "feature_bias": lo.feature_bias, "eps": lo.eps, "affine": lo.affine, "compat": lo.compat,
                      "softmax_layers": [i for i, k in enumerate(model.kinds) if k == "softmax"]},
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
    }


def _torch_save_atomic(state_dict: dict[str, np.ndarray], path: Path, torch_dtype) -> None:
    """torch.save({"model_state_dict": {name: tensor}}) under a temporary name, then renamed: tensors and str keys
    only, so `torch.load(path, weights_only=True)` (torch's default) reads it."""
    from collections import OrderedDict

    import torch

    from lolcats_jax.fsio import atomic_path

    sd = OrderedDict((k, torch.from_numpy(np.array(v, np.float32)).to(torch_dtype)) for k, v in state_dict.items())
    with atomic_path(path) as tmp:
        torch.save({"model_state_dict": sd}, tmp)


def write_lolcats_checkpoint(model, out_dir: Path, dtype: np.dtype | None = None, *, name: str = "lolcats",
                             base_path: str | None = None, allow_noncompat: bool = False) -> list[Path]:
    """Writes what the original's scripts load into `out_dir` (each file atomically) and returns the paths:

        {name}_distill.pt      feature maps + window factors, keys model.layers.{i}.self_attn.… (§8.1)
        {name}_ft.pt           attention LoRA, PEFT keys (§8.2)                     (only with LoRA)
        model_config.yaml      model YAML with the attention settings (§8.6)
        finetune_config.yaml   the finetune block (r, lora_alpha, target_modules)    (only with LoRA)
        lolcats_config.json    this project's description (what `convert.from_lolcats` needs to re-import)

    Tensors are bfloat16 (as the original stores them) unless `dtype` is float32."""
    import torch
    import yaml

    from lolcats_jax.fsio import write_bytes_atomic

    reason = noncompat_reason(model)
    if reason is not None and not allow_noncompat:
        raise ConversionError(f"refusing --format lolcats: {reason}; pass --allow-noncompat to write it anyway, or "
                              f"export with --format hf (which carries this project's own modeling code)")
    torch_dtype = torch.float32 if dtype is not None and np.dtype(dtype) == np.float32 else torch.bfloat16
    distill, ft = split_for_original(lolcats_tensors(model))
    if not distill and not ft:
        raise ConversionError("the model has neither linearized layers nor LoRA adapters: nothing to write")
    written = []
    for suffix, sd in ((DISTILL_SUFFIX, distill), (FT_SUFFIX, ft)):
        if sd:
            _torch_save_atomic(sd, out_dir / f"{name}{suffix}", torch_dtype)
            written.append(out_dir / f"{name}{suffix}")
    dtype_name = "float32" if torch_dtype == torch.float32 else "bfloat16"
    texts = {MODEL_YAML: yaml.safe_dump(model_yaml(model, base_path, dtype_name), sort_keys=False)}
    if ft:
        texts[FINETUNE_YAML] = yaml.safe_dump(finetune_yaml(model), sort_keys=False)
    texts[CONFIG_FILE] = json.dumps(describe(model), indent=2) + "\n"
    for file_name, text in texts.items():
        write_bytes_atomic(out_dir / file_name, text.encode())
        written.append(out_dir / file_name)
    return written


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
    L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
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
