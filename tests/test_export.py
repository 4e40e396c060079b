"""Export of linearized models: Hugging Face directory with our own PyTorch modeling code (parity with JAX, recurrent
generation), bit-exact re-import, the original LoLCATS checkpoint layout both ways, refusal of bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import flax_to_hf, from_hf, from_lolcats, lolcats_format, to_hf
from convert.errors import ConversionError
from convert.safetensors_io import SafetensorsDir, save_file
from lolcats_jax.model import Llama, LlamaConfig, LolcatsLayerOptions, LoraOptions, ModelOptions

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=16, rope_theta=10000.0, max_position_embeddings=256)
W, F, R, ALPHA = 4, 8, 4, 8.0
KINDS = ("lolcats", "softmax", "lolcats")  # layer 1 stays softmax
E, H, K, D = CFG.hidden_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
VARIANTS = {  # name -> LolcatsLayerOptions overrides
    "tk": {}, "sw": {"window": "sw"}, "tk_compat": {"compat": True}, "linear": {"form": "linear"},
    "bias_affine_exp": {"window": "sw", "feature_bias": True, "affine": True, "feature_map": "exp_dim"},
}


FAMILIES = {"llama": {}, "qwen2": dict(model_type="qwen2", qkv_bias=True), "qwen3": dict(model_type="qwen3", qk_norm=True),
            "mixtral": dict(model_type="mixtral", num_experts=4, num_experts_per_tok=2)}


def make_model(variant: str = "tk", *, targets=("q", "k", "v", "o"), seed: int = 0, family: str = "llama") -> Llama:
    """A tiny linearized Llama (or Qwen2 / Qwen3) with random weights, feature maps, window logits, biases and
    nonzero LoRA B. Parameters are drawn with numpy into an abstractly built model (no XLA compilation)."""
    lo = LolcatsLayerOptions(window_size=W, feature_dim=F, backend="reference", **VARIANTS[variant])
    lora = LoraOptions(rank=R, alpha=ALPHA, targets=targets) if targets else None
    opts = ModelOptions(param_dtype="float32", compute_dtype="float32", remat=False, layer_kinds=KINDS, lolcats=lo,
                        lora=lora)
    cfg = dataclasses.replace(CFG, **FAMILIES[family])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(cfg, opts, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path: tuple, shape: tuple[int, ...]) -> jax.Array:
        name = str(path[-1])
        if name.endswith("norm"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            scale = {"embed": 1.0, "lm_head": 0.2}.get(name, 0.5 if path[0] == "lolcats" else 0.1)
            value = scale * rng.standard_normal(shape)
        return jnp.asarray(value, jnp.float32)

    flat = [(p, v.replace(draw(p, v.get_value().shape))) for p, v in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def with_options(model: Llama, **lolcats_overrides) -> Llama:
    """The same parameters under other lolcats options (e.g. compat=True)."""
    opts = dataclasses.replace(model.opts, lolcats=dataclasses.replace(model.opts.lolcats, **lolcats_overrides))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(model.cfg, opts, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


_FORWARDS: dict[int, tuple] = {}


def jax_logits(model: Llama, toks: np.ndarray, state: nnx.State | None = None) -> np.ndarray:
    """float32 logits of `model` (jitted once per model and shape); `state` replaces its parameters (same tree)."""
    if id(model) not in _FORWARDS:
        graphdef, own = nnx.split(model)
        _FORWARDS[id(model)] = (jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)), own, model)
    fn, own, _ = _FORWARDS[id(model)]
    return np.asarray(fn(own if state is None else state, jnp.asarray(toks)))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tokens(batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, length))


def write_tokenizer(path: Path) -> Path:
    """A word-level tokenizer over the tiny vocabulary (w0 … w127)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(CFG.vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1").save_pretrained(str(path))
    return path


def load_hf(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, local_files_only=True,
                                                dtype=dtype).eval()


def hf_logits(hf, toks: np.ndarray, **kw) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(toks), **kw).logits.float().numpy()


def file_bytes(model_dir: Path) -> dict[str, tuple[str, bytes]]:
    files = SafetensorsDir(model_dir)
    return {k: (files.info(k).dtype, files.file_of(k).read(k).tobytes()) for k in files.keys()}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny torch models run ~50x faster on one thread than on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Llama, Path]]:
    root = tmp_path_factory.mktemp("export")
    tok_dir = write_tokenizer(root / "tok")
    out = {}
    for variant in VARIANTS:
        model = make_model(variant)
        to_hf.export_linearized(model, tok_dir, root / variant, max_shard_size="40KB")
        out[variant] = (model, root / variant)
    return out


# ---------------------------------------------------------------------------------------------- HF format

SEQ = tokens(2, 21)  # parity input; compat masks depend on the length, the other forms are causal (prefixes)
LENGTHS = (3, 11, 13, 21)  # ≤ W, and lengths that are not multiples of W beyond 2W


def reference_logits(model: Llama, length: int) -> np.ndarray:
    """JAX logits of SEQ[:, :length] (from the full sequence unless compat masks make the length matter)."""
    if model.opts.lolcats.compat:
        return jax_logits(model, SEQ[:, :length])
    return jax_logits(model, SEQ)[:, :length]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_logits_match_jax(exported, variant):
    model, path = exported[variant]
    hf = load_hf(path)
    assert type(hf).__name__ == "LolcatsLlamaForCausalLM"
    for length in (3, 13) if variant == "tk_compat" else LENGTHS:
        err = rel_err(hf_logits(hf, SEQ[:, :length], use_cache=False), reference_logits(model, length))
        assert err <= 1e-4, (variant, length, err)


def test_attention_variants_differ(exported):
    """Guards the parity tests: window kind, compat masks and the linear form all change these models' logits."""
    logits = {v: reference_logits(exported[v][0], 13) for v in ("tk", "sw", "tk_compat", "linear")}
    names = list(logits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert rel_err(logits[a], logits[b]) > 1e-3, (a, b)


def test_hf_directory_contents(exported):
    model, path = exported["bias_affine_exp"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "lolcats_llama"
    assert config["auto_map"] == {"AutoConfig": "configuration_lolcats.LolcatsLlamaConfig",
                                  "AutoModel": "modeling_lolcats.LolcatsLlamaModel",
                                  "AutoModelForCausalLM": "modeling_lolcats.LolcatsLlamaForCausalLM"}
    lo = config["lolcats"]
    assert (lo["window"], lo["window_size"], lo["feature_dim"], lo["feature_bias"], lo["affine"]) == ("sw", W, F, True, True)
    assert lo["softmax_layers"] == [1] and lo["lora"] == {"merged": True, "rank": R, "alpha": ALPHA,
                                                           "targets": ["q", "k", "v", "o"]}
    for name in ("modeling_lolcats.py", "configuration_lolcats.py", "tokenizer.json", "model.safetensors.index.json"):
        assert (path / name).is_file(), name
    files = SafetensorsDir(path)
    assert len(files.file_names) > 1  # sharded
    extra = {k: files.info(k).shape for k in files.keys() if "feature_map" in k or "window_factors" in k}
    expected = {}
    for i in (0, 2):
        pre = f"model.layers.{i}.self_attn."
        expected.update({pre + "feature_map_q.weight": (H, D, F), pre + "feature_map_k.weight": (H, D, F),
                         pre + "feature_map_q.bias": (H,), pre + "feature_map_k.bias": (H,), pre + "window_factors": (H,)})
    assert extra == expected
    theta = files.file_of("model.layers.2.self_attn.window_factors").read("model.layers.2.self_attn.window_factors")
    np.testing.assert_array_equal(theta, np.asarray(model.lolcats.window_logit[...][1]))
    from transformers import AutoTokenizer  # remote-code directories need trust_remote_code for the tokenizer too

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, local_files_only=True)
    assert tok("w5 w7")["input_ids"] == [5, 7]


def read_pt(path: Path) -> dict[str, np.ndarray]:
    """The `model_state_dict` of a .pt file as float32 arrays (torch's default, weights-only loading)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
    return {k: v.float().numpy() for k, v in sd.items()}


def test_merged_lora_equals_base_plus_lolcats_format_adapters(exported, tmp_path):
    """q_proj in the HF export = base q_proj + (α/r)·B A with B, A read from the LoLCATS-layout export: checks the
    merge and both layouts against each other."""
    model, path = exported["tk"]
    to_hf.export_linearized(model, None, tmp_path / "lc", format="lolcats", dtype="float32", allow_noncompat=True)
    adapters = read_pt(tmp_path / "lc" / "lolcats_ft.pt")
    files = SafetensorsDir(path)
    for i in range(CFG.num_layers):
        for t, ours in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
            a = adapters[lolcats_format.lora_key(i, t, "A")].astype(np.float64)
            b = adapters[lolcats_format.lora_key(i, t, "B")].astype(np.float64)
            w = np.asarray(getattr(model.layers, ours)[...][i], np.float64)
            base = w.reshape(E, -1).T if t != "o" else w.reshape(-1, E).T  # HF (out, in)
            name = f"model.layers.{i}.self_attn.{t}_proj.weight"
            merged = files.file_of(name).read(name)
            np.testing.assert_allclose(merged, base + ALPHA / R * (b @ a), rtol=0, atol=1e-6)
            assert np.abs(merged - base).max() > 1e-4


@pytest.mark.parametrize("variant", ["tk", "sw"])
def test_generate_with_cache_matches_jax_greedy(exported, variant):
    model, path = exported[variant]
    hf = load_hf(path)
    prompts, steps = tokens(2, 7, seed=5), 14  # decoding crosses several W-blocks; 7 + 14 = SEQ's length
    kw = dict(max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = hf.generate(torch.tensor(prompts), use_cache=True, **kw)
        uncached = hf.generate(torch.tensor(prompts), use_cache=False, **kw)
    seqs = cached.sequences.numpy()
    np.testing.assert_array_equal(seqs, uncached.sequences.numpy())
    assert rel_err(torch.stack(cached.logits).numpy(), torch.stack(uncached.logits).numpy()) <= 1e-5
    # greedy decoding by the JAX model picks every generated token: argmax of its logits along the sequence
    ref = jax_logits(model, seqs)
    np.testing.assert_array_equal(ref[:, 6:-1].argmax(-1), seqs[:, 7:])
    import kernels.lolcats as kl

    if hasattr(kl, "decode_step") and hasattr(kl, "prefill_state"):  # the JAX recurrent decoder, once it exists
        from lolcats_jax.inference.generation import Generator

        assert Generator(model).generate([list(p) for p in prompts], steps) == seqs[:, 7:].tolist()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mixtral"])
def test_family_export_matches_jax(tmp_path, family):
    """A linearized Qwen2 (q/k/v biases) / Qwen3 (q/k RMSNorm) / Mixtral (4 experts, top 2, LoRA on the experts too):
    transformers loads the export with the family's attention class in the softmax layer (and Mixtral's expert
    names); logits (parallel and cached greedy generation) match JAX; re-import is bit-exact."""
    targets = ("q", "k", "v", "o", "gate", "up", "down") if family == "mixtral" else ("q", "k", "v", "o")
    model = make_model("tk", family=family, targets=targets)
    written = to_hf.export_linearized(model, None, tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    assert type(hf.model.layers[1].self_attn).__name__ == {"qwen2": "Qwen2Attention", "qwen3": "Qwen3Attention",
                                                           "mixtral": "LlamaAttention"}[family]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["lolcats"]["base_model_type"] == family
    names = {n for p in written if p.suffix == ".safetensors" for n in SafetensorsDir(tmp_path / "hf").keys()}
    extra = {"qwen2": "self_attn.v_proj.bias", "qwen3": "self_attn.k_norm.weight",
             "mixtral": "block_sparse_moe.experts.3.w2.weight"}[family]
    assert {f"model.layers.{i}.{extra}" for i in range(3)} <= names
    for length in LENGTHS:
        assert rel_err(hf_logits(hf, SEQ[:, :length], use_cache=False), reference_logits(model, length)) <= 1e-4
    prompts = tokens(2, 7, seed=5)
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), use_cache=True, max_new_tokens=10, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    seqs = out.numpy()
    np.testing.assert_array_equal(jax_logits(model, seqs)[:, 6:-1].argmax(-1), seqs[:, 7:])
    back = from_hf.load_linearized(tmp_path / "hf")
    assert back.cfg == model.cfg and back.kinds == KINDS
    to_hf.export_linearized(back, None, tmp_path / "again")
    assert file_bytes(tmp_path / "hf") == file_bytes(tmp_path / "again")


@pytest.mark.parametrize("variant", ["tk", "sw", "linear", "bias_affine_exp"])
def test_recurrent_decode_equals_parallel(exported, variant):
    """Prefill, a multi-token chunk on the cache, then single tokens == one parallel forward (every position)."""
    from transformers import DynamicCache

    _, path = exported[variant]
    hf = load_hf(path)
    seq = torch.tensor(tokens(2, 21, seed=3))
    with torch.no_grad():
        full = hf(seq, use_cache=False).logits
        cache = DynamicCache(config=hf.config)
        parts, pos = [], 0
        for n in (5, 6) + (1,) * 10:
            out = hf(seq[:, pos:pos + n], cache=cache, use_cache=True)
            cache, pos = out.cache, pos + n
            parts.append(out.logits)
    assert rel_err(torch.cat(parts, 1).numpy(), full.numpy()) <= 1e-5
    held = max(layer.keys.shape[-2] for layer in cache.layers if type(layer).__name__ == "LolcatsCacheLayer")
    assert held <= {"tk": 2 * W, "sw": W, "linear": 0, "bias_affine_exp": W}[variant]


def test_bfloat16_export(exported, tmp_path):
    model, _ = exported["tk"]
    to_hf.export_linearized(model, None, tmp_path / "bf16", dtype="bfloat16")
    files = SafetensorsDir(tmp_path / "bf16")
    assert files.info("model.layers.0.self_attn.q_proj.weight").dtype == "BF16"
    assert files.info("model.layers.0.self_attn.feature_map_q.weight").dtype == "F32"
    hf = load_hf(tmp_path / "bf16", dtype=torch.bfloat16)
    assert hf.model.layers[0].self_attn.feature_map_q.weight.dtype == torch.float32
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert rel_err(hf_logits(hf, SEQ), reference_logits(model, 21)) <= 5e-2


# ------------------------------------------------------------------------------------------------ re-import


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_import_round_trip_is_bit_exact(exported, tmp_path, dtype):
    model, _ = exported["bias_affine_exp"]
    first, second = tmp_path / "first", tmp_path / "second"
    to_hf.export_linearized(model, None, first, dtype=dtype)
    back = from_hf.load_linearized(first)
    assert back.opts.lora is None and not hasattr(back, "lora")
    assert back.opts.lolcats.feature_bias and back.kinds == KINDS
    to_hf.export_linearized(back, None, second)
    assert file_bytes(first) == file_bytes(second)
    configs = [json.loads((d / "config.json").read_text()) for d in (first, second)]
    assert configs[0]["lolcats"].pop("lora")["merged"] and configs[1]["lolcats"].pop("lora") is None
    assert configs[0] == configs[1]
    if dtype is None:  # same logits (up to the rounding of the merge)
        assert rel_err(jax_logits(back, SEQ), reference_logits(model, 21)) <= 1e-5


def test_import_refuses_bad_hf_directories(exported, tmp_path):
    _, path = exported["tk"]
    with pytest.raises(ConversionError, match="lolcats_llama"):
        from_hf.load_linearized(_copy_dir(path, tmp_path / "plain", edit_config=lambda c: c.update(model_type="llama")))
    bad = _copy_dir(path, tmp_path / "wrong_f", edit_config=lambda c: c["lolcats"].update(feature_dim=F + 1))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.feature_map_q\.weight.*shape"):
        from_hf.load_linearized(bad)
    bad = _copy_dir(path, tmp_path / "all_lin", edit_config=lambda c: c["lolcats"].update(layer_kinds=["lolcats"] * 3))
    with pytest.raises(ConversionError, match=r"missing tensor.*model\.layers\.1\.self_attn\.feature_map_q\.weight"):
        from_hf.load_linearized(bad)


def _copy_dir(src: Path, dst: Path, edit_config) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------------------------------ LoLCATS layout


def test_lolcats_format_has_exactly_the_documented_keys(exported, tmp_path):
    model, _ = exported["tk_compat"]
    written = to_hf.export_linearized(model, None, tmp_path / "lc", format="lolcats")
    assert sorted(p.name for p in written) == ["finetune_config.yaml", "lolcats_config.json", "lolcats_distill.pt",
                                               "lolcats_ft.pt", "model_config.yaml"]
    raw = {n: torch.load(tmp_path / "lc" / n, weights_only=True) for n in ("lolcats_distill.pt", "lolcats_ft.pt")}
    assert all(set(r) == {"model_state_dict"} for r in raw.values())
    assert {v.dtype for r in raw.values() for v in r["model_state_dict"].values()} == {torch.bfloat16}  # as the original
    distill, ft = (read_pt(tmp_path / "lc" / n) for n in ("lolcats_distill.pt", "lolcats_ft.pt"))
    expected_distill, expected_ft = {}, {}
    for i in (0, 2):
        P = f"model.layers.{i}.self_attn."
        expected_distill.update({P + "feature_map_q.mlp.layer": (4, 16, 8), P + "feature_map_k.mlp.layer": (4, 16, 8),
                                 P + "window_factors": (1, 4, 1, 1)})
    for i in range(3):
        P = f"base_model.model.model.layers.{i}.self_attn."
        for t, a_shape, b_shape in (("q", (4, 64), (64, 4)), ("k", (4, 64), (32, 4)), ("v", (4, 64), (32, 4)),
                                    ("o", (4, 64), (64, 4))):
            expected_ft[P + f"{t}_proj.lora_A.default.weight"] = a_shape
            expected_ft[P + f"{t}_proj.lora_B.default.weight"] = b_shape
    assert {k: v.shape for k, v in distill.items()} == expected_distill
    assert {k: v.shape for k, v in ft.items()} == expected_ft
    bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    np.testing.assert_array_equal(distill["model.layers.2.self_attn.window_factors"].reshape(-1),
                                  bf16(model.lolcats.window_logit[...][1]))
    np.testing.assert_array_equal(distill["model.layers.0.self_attn.feature_map_k.mlp.layer"],
                                  bf16(model.lolcats.fmap_k[...][0]))
    np.testing.assert_array_equal(ft["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"],
                                  bf16(np.asarray(model.lora.q_a[...][1]).T))
    described = json.loads((tmp_path / "lc" / lolcats_format.CONFIG_FILE).read_text())
    assert described["lora"] == {"rank": R, "alpha": ALPHA, "targets": ["q", "k", "v", "o"]}


def test_lolcats_format_refuses_noncompat_tk(exported, tmp_path):
    """A default-mode (start-aligned) tk model would be evaluated with other masks by the original: refused unless
    forced; sw windows are the same math in both and pass."""
    with pytest.raises(ConversionError, match="compat.*--allow-noncompat"):
        to_hf.export_linearized(exported["tk"][0], None, tmp_path / "tk", format="lolcats")
    assert not (tmp_path / "tk").exists()
    to_hf.export_linearized(exported["tk"][0], None, tmp_path / "tk", format="lolcats", allow_noncompat=True)
    to_hf.export_linearized(exported["sw"][0], None, tmp_path / "sw", format="lolcats")
    assert (tmp_path / "tk" / "lolcats_distill.pt").is_file() and (tmp_path / "sw" / "lolcats_distill.pt").is_file()


def test_lolcats_format_refuses_mlp_lora(tmp_path):
    model = make_model("tk_compat", targets=("q", "gate"))
    with pytest.raises(ConversionError, match="gate"):
        to_hf.export_linearized(model, None, tmp_path / "lc", format="lolcats")
    assert not (tmp_path / "lc").exists()


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    """Base HF directory + LoLCATS-layout export of the tk model, imported as a run directory; and the source model
    in compat mode (same parameters)."""
    root = tmp_path_factory.mktemp("import")
    model, _ = exported["tk_compat"]
    base = root / "base"
    flax_to_hf.export_hf(model, base)  # base weights only: no LoRA, no feature maps
    write_tokenizer(base)
    to_hf.export_linearized(model, None, root / "lc", format="lolcats", dtype="float32")
    ckpts = [root / "lc" / "lolcats_distill.pt", root / "lc" / "lolcats_ft.pt"]
    run = from_lolcats.import_lolcats(base, ckpts, root / "run", window="tk", window_size=W, lora_alpha=ALPHA)
    return model, base, ckpts, run


@pytest.fixture(scope="module")
def loaded_run(imported):
    """(model, tokenizer) of the imported run directory, loaded once (building the model compiles its init)."""
    from lolcats_jax.inference.run_model import load_run_model

    return load_run_model(imported[3])


def test_import_lolcats_matches_compat_source(imported, loaded_run):
    """Export --format lolcats → import → the run's model = the source in compat mode: same options (but the
    backend), and the same logits."""
    compat_source = imported[0]
    loaded, _tokenizer = loaded_run
    assert dataclasses.replace(loaded.opts.lolcats, backend="reference") == compat_source.opts.lolcats
    assert loaded.kinds == KINDS and loaded.opts.lora == compat_source.opts.lora
    got = jax_logits(compat_source, SEQ[:, :13], state=jax.tree.map(np.asarray, nnx.state(loaded)))
    np.testing.assert_allclose(got, reference_logits(compat_source, 13), rtol=0, atol=1e-6)


def test_import_lolcats_released_layout(imported, tmp_path, capsys):
    """The released layout: one combined file (`base_model.model.model.` prefix, no wrapper, the `window_factor`
    alias, adapter names without `default`) as safetensors, alpha defaulting to 2·r, gives the same run as the two
    .pt files."""
    from lolcats_jax.train.ckpt import load_params

    _, base, ckpts, pt_run = imported
    tensors = {}
    for p in ckpts:
        for k, v in read_pt(p).items():
            k = k if k.startswith("base_model.") else "base_model.model." + k
            k = k.replace("window_factors", "window_factor") if ".2." in k else k
            tensors[k.replace(".default.weight", ".weight")] = v
    assert "base_model.model.model.layers.2.self_attn.window_factor" in tensors
    save_file(tensors, tmp_path / "combined.safetensors")
    run = from_lolcats.import_lolcats(base, [tmp_path / "combined.safetensors"], tmp_path / "run",
                                      window="tk", window_size=W)
    assert "alpha" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == (pt_run / "config.yaml").read_text().replace(str(pt_run), str(run))
    parsed = lolcats_format.parse_checkpoint({k: v for p in ckpts for k, v in read_pt(p).items()}, CFG)
    expected = {"distill": {"lolcats/fmap_q": parsed.fmap_q, "lolcats/fmap_k": parsed.fmap_k,
                            "lolcats/window_logit": parsed.window_logit},
                "finetune": {f"lora/{k}": v for k, v in parsed.lora.items()}}
    for stage, want in expected.items():
        got, _meta = load_params(run / stage / "final", {k: jnp.asarray(v) for k, v in want.items()})
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=f"{stage} {k}")


def test_run_directory_exports_to_hf(imported, loaded_run, tmp_path, monkeypatch):
    """`python -m convert.to_hf --run RUNDIR` (the imported run) → HF logits == the compat JAX source."""
    import lolcats_jax.inference.run_model

    compat_source, _, _, run = imported
    monkeypatch.setattr(lolcats_jax.inference.run_model, "load_run_model", lambda run_dir: loaded_run)  # loaded once above
    assert to_hf.main(["--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["lolcats"]["compat"] is True
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    got = hf_logits(load_hf(tmp_path / "hf"), SEQ[:, :13], use_cache=False)
    assert rel_err(got, reference_logits(compat_source, 13)) <= 1e-4
    monkeypatch.undo()
    assert to_hf.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == ConversionError.exit_code


def test_lolcats_import_refuses_bad_checkpoints(imported, tmp_path):
    _, base, ckpts, _ = imported
    good = {(k if k.startswith("base_model.") else "base_model.model." + k): v for p in ckpts for k, v in read_pt(p).items()}
    P = "base_model.model.model.layers.{}.self_attn."
    cases = {
        "missing": ({k: v for k, v in good.items() if k != P.format(2) + "window_factors"},
                    r"missing key layers\.2\.self_attn\.window_factors"),
        "shape": ({**good, P.format(0) + "feature_map_k.mlp.layer": np.zeros((4, 16, 9), np.float32)},
                  r"feature_map_k\.mlp\.layer.*shape \[4, 16, 9\]"),
        "lora_shape": ({**good, P.format(1) + "v_proj.lora_B.default.weight": np.zeros((64, 4), np.float32)},
                       r"v_proj\.lora_B.*shape \[64, 4\]"),
        "mlp_target": ({**good, "base_model.model.model.layers.0.mlp.gate_proj.lora_A.default.weight":
                        np.zeros((4, 64), np.float32)}, r"mlp\.gate_proj\.lora_A.*unsupported target"),
        "unknown": ({**good, "base_model.model.lm_head.weight": np.zeros((2, 2), np.float32)}, r"lm_head"),
        "only_lora": ({k: v for k, v in good.items() if "lora" in k}, r"no feature maps"),
        "lonely_A": ({k: v for k, v in good.items() if k != P.format(0) + "o_proj.lora_B.default.weight"},
                     r"missing key layers\.0\.self_attn\.o_proj\.lora_B"),
    }
    for name, (tensors, pattern) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(ConversionError, match=pattern):
            from_lolcats.import_lolcats(base, [tmp_path / f"{name}.safetensors"], tmp_path / f"run_{name}", window_size=W)
        assert not (tmp_path / f"run_{name}").exists(), name
    assert from_lolcats.main(["--base", str(base), "--ckpt", str(tmp_path / "missing.safetensors"),
                              "--out", str(tmp_path / "cli")]) == ConversionError.exit_code


# ---------------------------------------------------------------- the original's own loading rules (PyTorch + PEFT)


def original_converted_model(base_dir: Path, model_yaml: dict):
    """The original's model after `convert_attention` (reference §8.1, §8.6), rebuilt independently: the base Llama
    from transformers, every parameter frozen, and in each linearized layer the attention parameters the original
    registers, under its names: `feature_map_{q,k}.mlp.layer` (H, D, F) [+ `.mlp.bias` (1, H, 1, 1)] and
    `window_factors` (1, H, 1, 1), initialised as its YAML says."""
    from torch import nn
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
    for p in model.parameters():
        p.requires_grad = False
    att = model_yaml["attention"]
    H, F = model.config.num_attention_heads, att["learned_kernel_kwargs"]["feature_dim"]
    Dh = model.config.hidden_size // H
    for i, layer in enumerate(model.model.layers):
        if i in att.get("softmax_attentions", []):
            continue
        for which in ("q", "k"):
            fmap = nn.Module()
            fmap.mlp = nn.Module()
            fmap.mlp.layer = nn.Parameter(torch.zeros(H, Dh, F))
            if att["learned_kernel_kwargs"]["bias"]:
                fmap.mlp.bias = nn.Parameter(torch.zeros(1, H, 1, 1))
            setattr(layer.self_attn, f"feature_map_{which}", fmap)
        layer.self_attn.window_factors = nn.Parameter(torch.full((1, H, 1, 1), att["init_window_factor"]))
    return model


def original_load(model, path: Path) -> tuple[list[str], list[str]]:
    """`load_and_convert_attns` / `load_and_convert_finetune` (reference §5.1): torch.load(path)['model_state_dict'],
    load_state_dict(strict=False); returns (missing, unexpected)."""
    keys = model.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"], strict=False)
    return list(keys.missing_keys), list(keys.unexpected_keys)


def original_peft(model, finetune_yaml: dict):
    """`create_peft_config` (reference §5.2): target modules rewritten to `self_attn.<name>`, PEFT LoRA wrap."""
    from peft import LoraConfig, TaskType, get_peft_model

    kw = dict(finetune_yaml["finetune"]["kwargs"])
    kw["target_modules"] = [f"self_attn.{m}" for m in kw["target_modules"]]
    return get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, **kw))


@pytest.mark.parametrize("variant", ["tk_compat", "bias_affine_exp"])
def test_original_loaders_read_the_lolcats_export(exported, tmp_path, variant):
    """The original's two-step path (distill checkpoint into the converted model, then PEFT, then the ft checkpoint)
    finds every key of our export: none unexpected, no attention or LoRA parameter left missing, the values land
    where they belong and PEFT's q_proj computes the same W + (α/r)·B A as this model."""
    import yaml

    model, _ = exported[variant]
    base = tmp_path / "base"
    flax_to_hf.export_hf(model, base)
    out = tmp_path / "lc"
    to_hf.export_linearized(model, None, out, format="lolcats", dtype="float32")
    model_yaml = yaml.safe_load((out / "model_config.yaml").read_text())
    finetune_yaml = yaml.safe_load((out / "finetune_config.yaml").read_text())
    lo = model.opts.lolcats
    assert model_yaml["attention"]["attention_type"] == f"lolcats_llama_window_{lo.window}"
    assert model_yaml["attention"]["window_size"] == W and model_yaml["attention"]["softmax_attentions"] == [1]
    assert model_yaml["attention"]["feature_map"] == lo.feature_map
    assert model_yaml["attention"]["affine_attention_factors"] == lo.affine

    torch_model = original_converted_model(base, model_yaml)
    missing, unexpected = original_load(torch_model, out / "lolcats_distill.pt")
    assert unexpected == []
    assert not [k for k in missing if "feature_map" in k or "window_factors" in k]
    torch_model = original_peft(torch_model, finetune_yaml)
    missing, unexpected = original_load(torch_model, out / "lolcats_ft.pt")
    assert unexpected == []
    assert not [k for k in missing if "lora_" in k]  # the attention parameters came with the distill file

    attn = torch_model.base_model.model.model.layers[2].self_attn
    np.testing.assert_array_equal(attn.feature_map_q.mlp.layer.detach().numpy(), model.lolcats.fmap_q[...][1])
    np.testing.assert_array_equal(attn.window_factors.detach().numpy().reshape(-1), model.lolcats.window_logit[...][1])
    if lo.feature_bias:
        np.testing.assert_array_equal(attn.feature_map_k.mlp.bias.detach().numpy().reshape(-1),
                                      model.lolcats.fbias_k[...][1])
    x = np.random.default_rng(0).standard_normal((3, E)).astype(np.float32)
    with torch.no_grad():
        got = attn.q_proj(torch.tensor(x)).numpy()
    wq = np.asarray(model.layers.wq[...][2], np.float64).reshape(E, -1)
    delta = np.asarray(model.lora.q_a[...][2], np.float64) @ np.asarray(model.lora.q_b[...][2], np.float64).reshape(R, -1)
    np.testing.assert_allclose(got, x @ (wq + ALPHA / R * delta), rtol=0, atol=1e-5)


def test_original_demo_loader_reads_the_lolcats_export(exported, tmp_path):
    """The original's demo loader (reference §8.5 step 4): both files into the PEFT-wrapped model, strict=False,
    retrying with 'model.' → 'model.model.' and then → 'base_model.model.model.' while keys are unexpected."""
    import yaml

    model, _ = exported["tk_compat"]
    base, out = tmp_path / "base", tmp_path / "lc"
    flax_to_hf.export_hf(model, base)
    to_hf.export_linearized(model, None, out, format="lolcats")
    model_yaml = yaml.safe_load((out / "model_config.yaml").read_text())
    torch_model = original_peft(original_converted_model(base, model_yaml),
                                yaml.safe_load((out / "finetune_config.yaml").read_text()))
    loaded = set()
    for name in ("lolcats_distill.pt", "lolcats_ft.pt"):
        sd = torch.load(out / name, weights_only=True)["model_state_dict"]
        for rename in (lambda k: k, lambda k: k.replace("model.", "model.model."),
                       lambda k: k.replace("model.", "base_model.model.model.")):
            renamed = {rename(k): v for k, v in sd.items()}
            if not torch_model.load_state_dict(renamed, strict=False).unexpected_keys:
                loaded |= set(renamed)
                break
        else:
            pytest.fail(f"{name}: unexpected keys after every renaming")
    trainable = {n for n, _ in torch_model.named_parameters() if "lora_" in n or "feature_map" in n or "window_factors" in n}
    assert loaded == trainable


CALLS = (6, 1, 1, 5, 3, 1, 9, 1, 2)  # tokens per call: prefill, decode steps, chunks shorter/longer than W and 2W


def _hf_calls(hf, seq) -> np.ndarray:
    """Last-position logits of each call of CALLS on one cache."""
    from transformers import DynamicCache

    cache, pos, out = DynamicCache(config=hf.config), 0, []
    with torch.no_grad():
        for n in CALLS:
            res = hf(seq[:, pos:pos + n], cache=cache, use_cache=True)
            cache, pos = res.cache, pos + n
            out.append(res.logits[:, -1].float().numpy())
    return np.stack(out, 1)


def _jax_calls(model, seq) -> np.ndarray:
    from lolcats_jax.inference.generation import Generator

    gen = Generator(model)
    rows = seq.tolist()
    session = gen.start([rows[0][:CALLS[0]]], max_len=sum(CALLS))
    out, pos = [np.asarray(session.logits)], CALLS[0]
    for n in CALLS[1:]:
        session = gen.extend(session, [rows[0][pos:pos + n]])
        out.append(np.asarray(session.logits))
        pos += n
    return np.stack(out, 1)


@pytest.mark.parametrize("variant", ["tk", "tk_compat"])
def test_hf_cache_continuation_matches_jax_sessions(exported, variant):
    """Multi-token calls on a cache: default mode equals the parallel form in both; compat follows the original's
    stateful branch in both (the JAX side is checked against an independent re-implementation of the original's
    cache in tests/kernels/test_lolcats_continuation.py)."""
    model, path = exported[variant]
    seq = tokens(1, sum(CALLS), seed=9)
    got = _hf_calls(load_hf(path), torch.tensor(seq))
    want = _jax_calls(model, seq)
    assert rel_err(got, want) <= 1e-4
    if variant == "tk":
        ends = np.cumsum(CALLS) - 1
        assert rel_err(got, jax_logits(model, seq)[:, ends]) <= 1e-4
    else:  # and the original's continuation is not the parallel form: the comparison can tell
        assert rel_err(got, _jax_calls(exported["tk"][0], seq)) > 1e-3
