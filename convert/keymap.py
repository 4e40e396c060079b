"""One table between Hugging Face Llama tensor names and this project's parameter layout, used both ways.

Notation: L layers, E hidden size, H query heads, K kv heads, D head dim, M MLP hidden, V vocabulary.
The layout on our side is the one documented in `lolcats_jax/model/llama.py`; per-layer weights are stacked
along a leading L axis, so an HF name with ``{i}`` is one layer of a stacked parameter. The expert MLPs of a
mixture-of-experts model (Mixtral) also stack X experts after L: an HF name with ``{i}`` and ``{j}`` is one expert
of one layer, and the layout applies to that one (E, M) / (M, E) matrix.

Each entry names a *layout*, i.e. how one (per-layer) block of ours relates to the HF matrix:

    same       ours == hf                                  embed (V,E), norms (E,)
    transpose  ours == hf.T                                w_gate/w_up (E,M) ← (M,E), w_down (M,E) ← (E,M),
                                                           lm_head (E,V) ← (V,E)
    heads_in   ours (E,N,D) == hf.T.reshape(E,N,D)         wq ← q_proj (H·D,E), wk/wv ← k/v_proj (K·D,E)
    heads_out  ours (N,D,E) == hf.T.reshape(N,D,E)         wo ← o_proj (E,H·D)
    heads_vec  ours (N,D) == hf.reshape(N,D)               bq ← q_proj.bias (H·D,), bk/bv ← k/v_proj.bias (K·D,)

A layout can also turn a slice of *our* block (one `jax.make_array_from_callback` index) into the slice of the
HF matrix that covers it: for heads a head range [h0, h1) is the contiguous row (or column) range
[h0·D, h1·D) of the HF matrix, so a loader reads only the bytes a device owns.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from lolcats_jax.model.llama import base_shapes
from lolcats_jax.model.llama_config import LlamaConfig

Index = tuple[slice, ...]  # one slice per dimension, normalised to concrete start/stop, step 1
ReadFn = Callable[[Index], np.ndarray]  # reads a slice of the HF matrix

# HF tensors that carry no weights and are ignored when present
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_step(index: Index) -> None:
    for s in index:
        if s.step not in (None, 1):
            raise ValueError(f"strided slices are not supported: {index}")


def _head_range(s_heads: slice, D: int) -> slice:
    return slice(s_heads.start * D, s_heads.stop * D)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a block of ours (shape `ours_shape`) is stored in an HF matrix."""

    name: str

    def hf_shape(self, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.name == "same":
            return tuple(ours_shape)
        if self.name == "transpose":
            a, b = ours_shape
            return (b, a)
        if self.name == "heads_in":
            E, N, D = ours_shape
            return (N * D, E)
        if self.name == "heads_out":
            N, D, E = ours_shape
            return (E, N * D)
        if self.name == "heads_vec":
            N, D = ours_shape
            return (N * D,)
        raise AssertionError(self.name)

    def read(self, read: ReadFn, index: Index, ours_shape: tuple[int, ...]) -> np.ndarray:
        """Our block restricted to `index`, reading only the HF rows/columns that cover it."""
        _check_step(index)
        if self.name == "same":
            return read(index)
        if self.name == "transpose":
            s0, s1 = index
            return read((s1, s0)).T
        if self.name == "heads_in":
            E, N, D = ours_shape
            s_e, s_n, s_d = index
            block = read((_head_range(s_n, D), s_e))  # (n·D, e)
            block = block.reshape(s_n.stop - s_n.start, D, -1)[:, s_d, :]  # (n, d, e)
            return block.transpose(2, 0, 1)  # (e, n, d)
        if self.name == "heads_out":
            N, D, E = ours_shape
            s_n, s_d, s_e = index
            block = read((s_e, _head_range(s_n, D)))  # (e, n·D)
            block = block.reshape(-1, s_n.stop - s_n.start, D)[:, :, s_d]  # (e, n, d)
            return block.transpose(1, 2, 0)  # (n, d, e)
        if self.name == "heads_vec":
            N, D = ours_shape
            s_n, s_d = index
            return read((_head_range(s_n, D),)).reshape(s_n.stop - s_n.start, D)[:, s_d]
        raise AssertionError(self.name)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """The HF matrix of a whole block of ours (C-contiguous)."""
        if self.name == "same":
            out = ours
        elif self.name == "transpose":
            out = ours.T
        elif self.name == "heads_in":
            out = ours.reshape(ours.shape[0], -1).T
        elif self.name == "heads_out":
            out = ours.reshape(-1, ours.shape[-1]).T
        elif self.name == "heads_vec":
            out = ours.reshape(-1)
        else:
            raise AssertionError(self.name)
        return np.ascontiguousarray(out)


SAME, TRANSPOSE, HEADS_IN, HEADS_OUT, HEADS_VEC = (Layout(n) for n in ("same", "transpose", "heads_in", "heads_out",
                                                                       "heads_vec"))

# our stacked per-layer parameter → (HF name template, layout)
LAYER_TABLE: dict[str, tuple[str, Layout]] = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", SAME),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", HEADS_IN),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", HEADS_IN),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", HEADS_IN),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", HEADS_OUT),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", HEADS_VEC),  # qkv_bias (Qwen2)
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", HEADS_VEC),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", HEADS_VEC),
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", SAME),  # qk_norm (Qwen3)
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", SAME),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", SAME),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", TRANSPOSE),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", TRANSPOSE),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", TRANSPOSE),
}


# Mixtral's MoE MLP (transformers' on-disk names: `save_pretrained` writes them, and loading renames them)
MOE_LAYER_TABLE: dict[str, tuple[str, Layout]] = {
    "router": ("model.layers.{i}.block_sparse_moe.gate.weight", TRANSPOSE),  # (X, E) → ours (E, X)
    "w_gate": ("model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", TRANSPOSE),
    "w_up": ("model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", TRANSPOSE),
    "w_down": ("model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", TRANSPOSE),
}


def layer_table(cfg: LlamaConfig) -> dict[str, tuple[str, Layout]]:
    """The rows of LAYER_TABLE that a model of `cfg` has (biases and q/k norms only in the families with them,
    the MoE rows instead of the dense MLP in mixture-of-experts models), in our parameter order."""
    table = {**LAYER_TABLE, **MOE_LAYER_TABLE} if cfg.is_moe else LAYER_TABLE
    return {name: table[name] for name in base_shapes(cfg)}


def layer_param_map(cfg: LlamaConfig, name: str, layers: range) -> "ParamMap":
    """The ParamMap of stacked per-layer parameter `name` over decoder `layers` (one HF tensor per layer, or per
    layer and expert for expert MLPs)."""
    template, layout = layer_table(cfg)[name]
    shape = tuple(base_shapes(cfg)[name])
    if "{j}" in template:
        names = tuple(template.format(i=i, j=j) for i in layers for j in range(cfg.num_experts))
        return ParamMap(("layers", name), names, layout, shape, stacked=True, experts=cfg.num_experts)
    return ParamMap(("layers", name), tuple(template.format(i=i) for i in layers), layout, shape, stacked=True)


# our top-level parameter → (HF name, layout)
GLOBAL_TABLE: dict[str, tuple[str, Layout]] = {
    "embed": ("model.embed_tokens.weight", SAME),
    "final_norm": ("model.norm.weight", SAME),
    "lm_head": ("lm_head.weight", TRANSPOSE),
}


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """One parameter of ours and the HF tensors it is made of (one per layer when `stacked`; one per layer and
    expert, layer-major, when `experts` > 0: then `block_shape` starts with the expert axis)."""

    path: tuple[str, ...]  # nnx path, e.g. ("layers", "wq")
    hf_names: tuple[str, ...]  # one name, or one per layer (per layer and expert)
    layout: Layout
    block_shape: tuple[int, ...]  # our shape without the layers axis
    stacked: bool
    experts: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.hf_names) // max(self.experts, 1)

    @property
    def shape(self) -> tuple[int, ...]:
        return ((self.num_layers,) if self.stacked else ()) + self.block_shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.layout.hf_shape(self.block_shape[1:] if self.experts else self.block_shape)

    def hf_name(self, layer: int, expert: int | None = None) -> str:
        return self.hf_names[layer * self.experts + expert] if self.experts else self.hf_names[layer]

    def read(self, read_hf: Callable[[str, Index], np.ndarray], index: Index, dtype: np.dtype) -> np.ndarray:
        """The slice `index` of our parameter in `dtype`, assembled from per-layer slices of the HF tensors.

        `read_hf(name, hf_index)` may return views (e.g. of a memory map): each block is copied once, transposed
        and cast, straight into the (C-contiguous) result."""
        index = normalise_index(index, self.shape)
        out = np.empty(tuple(s.stop - s.start for s in index), dtype)
        if not self.stacked:
            out[...] = self.layout.read(lambda ix: read_hf(self.hf_names[0], ix), index, self.block_shape)
            return out
        s_layers, rest = index[0], index[1:]
        for j, i in enumerate(range(s_layers.start, s_layers.stop)):
            if not self.experts:
                name = self.hf_names[i]
                out[j] = self.layout.read(lambda ix: read_hf(name, ix), rest, self.block_shape)
                continue
            for jx, x in enumerate(range(rest[0].start, rest[0].stop)):
                name = self.hf_name(i, x)
                out[j, jx] = self.layout.read(lambda ix: read_hf(name, ix), rest[1:], self.block_shape[1:])
        return out

    def hf_items(self, ours: Callable[[int | None, int | None], np.ndarray]) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        """(HF name, thunk giving the HF tensor) pairs; `ours(i, x)` returns layer i's block (expert x's matrix of
        it for expert parameters, x None otherwise; i None: the whole unstacked param)."""
        for n, name in enumerate(self.hf_names):
            layer, expert = (n // self.experts, n % self.experts) if self.experts else (n if self.stacked else None, None)
            yield name, (lambda layer=layer, expert=expert: self.layout.to_hf(ours(layer, expert)))


def normalise_index(index: Index, shape: tuple[int, ...]) -> Index:
    """Concrete (start, stop) slices for every dimension (missing trailing dims = whole dimension)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        if not isinstance(s, slice):
            raise TypeError(f"expected slices, got {index}")
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided slices are not supported: {index}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def param_maps(cfg: LlamaConfig) -> list[ParamMap]:
    """Every base parameter of a model with architecture `cfg`, in HF order (embed, layers, norm, head)."""
    L = cfg.num_layers
    E, V = cfg.hidden_size, cfg.vocab_size
    out = [ParamMap(("embed",), (GLOBAL_TABLE["embed"][0],), SAME, (V, E), stacked=False)]
    out += [layer_param_map(cfg, name, range(L)) for name in layer_table(cfg)]
    out.append(ParamMap(("final_norm",), (GLOBAL_TABLE["final_norm"][0],), SAME, (E,), stacked=False))
    if not cfg.tie_embeddings:
        out.append(ParamMap(("lm_head",), (GLOBAL_TABLE["lm_head"][0],), TRANSPOSE, (E, V), stacked=False))
    return out


def expected_hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name → shape, for every tensor an HF checkpoint of `cfg` must hold."""
    return {name: pm.hf_shape for pm in param_maps(cfg) for name in pm.hf_names}


def is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)
