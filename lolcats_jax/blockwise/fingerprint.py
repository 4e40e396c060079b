"""Fingerprints that tie a block-input store (and every block trained from it) to what produced it.

    model     sha256 of the HF `config.json`, names/sizes/mtimes of its safetensors files, the parameter and
              compute dtypes (they change the hidden states)
    block     the block size and the resulting block starts
    data      format, template, chunk size, validation split rule, the data files with their sizes, the
              tokenizer's fingerprint and a sha256 of the packed token ids (the samples, in store order)

The attention config is recorded next to the fingerprint but is not part of it: the stored softmax hidden states
do not depend on it (one collect serves any feature-map configuration).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lolcats_jax.config import Config, DataConfig

_SECTIONS = ("model", "block", "data")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint_id(fp: dict[str, Any]) -> str:
    """A short stable id of a whole fingerprint (what block results record)."""
    return _sha256(json.dumps(fp, sort_keys=True).encode())[:16]


def model_fingerprint(cfg: Config) -> dict[str, Any]:
    path = Path(cfg.model.path)
    config_json = path / "config.json"
    if not config_json.is_file():
        raise FileNotFoundError(f"{config_json}: not found (model.path must be a Hugging Face model directory)")
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
    return {
        "config_sha256": _sha256(config_json.read_bytes()),
        "weights": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "param_dtype": cfg.model.param_dtype,
        "compute_dtype": cfg.model.compute_dtype,
    }


def block_fingerprint(num_layers: int, size: int, starts: list[int]) -> dict[str, Any]:
    return {"size": size, "num_layers": num_layers, "starts": list(starts)}


def data_fingerprint(data: DataConfig, tokenizer: Any, token_rows: Iterable[np.ndarray]) -> dict[str, Any]:
    """`token_rows`: every stored sample's token ids, in store order (train, then validation)."""
    from lolcats_jax.data.cache import tokenizer_fingerprint
    from lolcats_jax.data.sources import resolve_paths

    def files(specs: tuple[str, ...]) -> list[list[Any]]:
        if not specs:
            return []
        return [[str(p.resolve()), p.stat().st_size] for p in resolve_paths(specs, data.format)]

    h = hashlib.sha256()
    for row in token_rows:
        h.update(np.ascontiguousarray(row, dtype=np.int32).tobytes())
    return {
        "format": data.format,
        "template": data.template,
        "chunk_size": data.chunk_size,
        "val_size": data.val_size if not data.validation else None,
        "max_train_chunks": data.max_train_chunks,
        "train_files": files(data.train),
        "validation_files": files(data.validation),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokens_sha256": h.hexdigest(),
    }


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints ("data.train_files", "model.config_sha256", …)."""
    out = []
    for section in _SECTIONS:
        a, b = stored.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}")
    return out


def describe_difference(diffs: list[str]) -> str:
    """'a different model and different data (model.config_sha256, data.tokens_sha256)'."""
    sections = []
    for d in diffs:
        s = d.split(".", 1)[0]
        if s not in sections:
            sections.append(s)
    words = {"model": "a different model", "block": "a different block size", "data": "different data"}
    return f"{' and '.join(words[s] for s in sections)} ({', '.join(diffs)})"


# attention settings that change what trained feature maps / window factors mean (not init- or backend-only ones)
ATTENTION_KEYS = (
    "kind", "form", "window", "window_size", "feature_map", "fullspace", "feature_dim", "feature_bias", "eps",
    "affine", "compat", "softmax_layers",
)


def attention_signature(attention: Any) -> dict[str, Any]:
    """The parts of an AttentionConfig that blocks stitched together must share."""
    import dataclasses

    d = dataclasses.asdict(attention) if dataclasses.is_dataclass(attention) else dict(attention)
    return {k: (list(d[k]) if isinstance(d[k], (tuple, list)) else d[k]) for k in ATTENTION_KEYS}
