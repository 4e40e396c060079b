"""Shared command-line plumbing: logging, and turning every error a user can cause into one clear line on stderr
with exit code 2.

* the project's user-facing errors (`UserError`, `ConfigError`, `ConversionError`, …): their message;
* exceptions of the storage and checkpoint libraries (Orbax, TensorStore, safetensors, grain) and OS errors
  (disk full, permissions): wrapped as `error: <what failed>: <type>: <message>` — their own tracebacks say
  nothing to a user; `--debug` (or `LOLCATS_DEBUG=1`) shows them.

Anything else is a bug of this project and keeps its traceback (exit 1). The error types are looked up only in
modules already imported, so reporting a config typo never imports JAX.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

# (module, class name) of the user-facing error types; a module not imported yet cannot have raised its error
_USER_ERRORS = (
    ("lolcats_jax.errors", "UserError"),
    ("lolcats_jax.config", "ConfigError"),
    ("lolcats_jax.model.llama_config", "UnsupportedModelError"),
    ("convert.errors", "ConversionError"),
)
# top-level packages whose exceptions are reported without their traceback
_LIBRARIES = ("orbax", "tensorstore", "safetensors", "grain", "yaml", "etils")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [FileNotFoundError]
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            types.append(cls)
    return tuple(types)


def library_error(e: BaseException) -> bool:
    """True for an exception raised by a storage/checkpoint library or the OS (something outside this code)."""
    if isinstance(e, OSError):
        return True
    return type(e).__module__.split(".")[0] in _LIBRARIES


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 600 else text[:600] + " …"


def run_main(main, *args) -> int:
    """Runs `main`; user errors → 'error: ...' on stderr and exit code 2."""
    argv = args[0] if args and isinstance(args[0], list) else sys.argv
    if "--debug" in (argv[1:] if argv is sys.argv else argv):  # sys.argv[0] is the program
        argv.remove("--debug")
        os.environ["LOLCATS_DEBUG"] = "1"
    try:
        return int(main(*args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, user_error_types()):
            message = str(e)
        elif library_error(e):
            cause = type(e).__name__ if isinstance(e, OSError) else f"{type(e).__module__.split('.')[0]} {type(e).__name__}"
            message = f"{cause}: {_one_line(e)} (run with --debug for the traceback)"
        else:
            raise
        if env_flag("LOLCATS_DEBUG"):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def command(main):
    """Decorates a CLI's `main(argv=None) -> int` so that calling it — from `python -m` or from code and tests —
    goes through `run_main`: the one error path of every command."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        return run_main(main, list(argv)) if argv is not None else run_main(main)

    return wrapped


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
