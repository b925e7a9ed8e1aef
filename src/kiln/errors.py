"""User-facing errors. Internals assert; anything a user can cause raises KilnError (printed as one line, exit 2)."""

from __future__ import annotations

import difflib
from typing import Iterable


class KilnError(Exception):
    """A mistake in the user's input: a file, a key or a value. The CLI prints it as one line and exits 2."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def require(module: str, extra: str, what: str = "this"):
    """Import an optional dependency, or raise a one-line KilnError naming the pip command that installs it:
    require("fastapi", "serve", "`kiln serve`") -> "`kiln serve` needs fastapi: pip install 'kiln[serve]'"."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise KilnError(f"{what} needs {module.split('.')[0]}: pip install 'kiln[{extra}]'") from None
