"""Shared command-line plumbing: logging, and turning the project's user-facing errors into one clear line on
stderr with exit code 2 (tracebacks only for genuine bugs)."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_error_types() -> tuple[type[BaseException], ...]:
    from lolcats_jax.config import ConfigError
    from lolcats_jax.model.llama_config import UnsupportedModelError

    types: list[type[BaseException]] = [ConfigError, UnsupportedModelError, FileNotFoundError]
    try:
        from convert.errors import ConversionError

        types.append(ConversionError)
    except ImportError:  # pragma: no cover
        pass
    from lolcats_jax.errors import UserError

    types.append(UserError)
    return tuple(types)


def run_main(main, *args) -> int:
    """Runs `main`; user errors → 'error: ...' on stderr and exit code 2."""
    try:
        return int(main(*args) or 0)
    except user_error_types() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
