"""The one exception type for user mistakes, shared by every module that checks input.

A ``ConfigError`` names the config field, file or step at fault and the fix;
the command-line entry points print it as a single ``error:`` line.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Iterable, Iterator


class ConfigError(ValueError):
    """A mistake in the config or its inputs, named by its field."""


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """A command-line entry point's body: a ConfigError exits with its one
    ``error:`` line, no traceback."""
    try:
        yield
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def first_line(e: BaseException) -> str:
    """'Type: first line of the message' of an exception, for one-line reports."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def unknown_field(path: str, key: str, options: Iterable[str]) -> ConfigError:
    """'unknown config field <path>' with the closest known field, or all of them."""
    options = list(options)
    guess = difflib.get_close_matches(key, options, n=1)
    hint = f"; did you mean {guess[0]!r}?" if guess else f"; known fields: {sorted(options)}"
    return ConfigError(f"unknown config field {path!r}{hint}")


def require(cond: bool, field: str, message: str) -> None:
    """Raises ``ConfigError('config.<field>: <message>')`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"config.{field}: {message}")
