"""The generation settings every face takes (`kiln generate`, `kiln.sample`, `kiln serve`'s completions), checked
in one place. No torch here: the CLI answers a bad flag in one line before it imports torch.

    check_generation(max_new_tokens=-5)                  -> KilnError "max_new_tokens must be >= 0, got -5"
    check_generation(top_p=1.5, names=CLI_FLAGS)         -> KilnError "--top-p must be in (0, 1], got 1.5"

A setting left at None is not checked (a face passes the ones it has). The error is a `GenerationError`, a
KilnError whose `param` is the setting's name as the face spells it (the server's 400 names it as its field).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from kiln.errors import KilnError

# the CLI's spelling of each setting (kiln generate's flags)
CLI_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
             "top_p": "--top-p", "num_beams": "--num-beams"}


class GenerationError(KilnError):
    """A generation setting out of its range; `param` is its name as the face that was given it spells it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# setting -> (an integer setting?, its range as the config's ranges are written, is a value in it)
_RULES = {
    "max_new_tokens": (True, ">= 0", lambda v: v >= 0),  # 0 returns the prompt
    "temperature": (False, ">= 0", lambda v: v >= 0),     # 0 = greedy
    "top_k": (True, ">= 0", lambda v: v >= 0),            # 0 = all tokens
    "top_p": (False, "in (0, 1]", lambda v: 0 < v <= 1),  # 1 = off
    "num_beams": (True, ">= 1", lambda v: v >= 1),        # 1 = sampling or greedy
}


def check_generation(max_new_tokens=None, temperature=None, top_k=None, top_p=None, num_beams=None, *,
                     names: dict[str, str] | None = None) -> None:
    """Raise a one-line GenerationError for the first setting out of its range (as the config's own range errors
    read: "--top-p must be in (0, 1], got 1.5"); None = not given."""
    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "num_beams": num_beams}
    for key, value in given.items():
        if value is None:
            continue
        integer, rule, inside = _RULES[key]
        typed = not isinstance(value, bool) and isinstance(value, Integral if integer else Real)
        if not (typed and math.isfinite(value) and inside(value)):
            name = (names or {}).get(key, key)
            kind = ("an integer " if integer else "a number ") if not typed else \
                ("" if math.isfinite(value) else "a finite number ")
            raise GenerationError(f"{name} must be {kind}{rule}, got {value!r}", name)
