"""Every verb's config, walked key by key: each numeric key declares its range once (its field's metadata, or a
verb's own override of the field), and loading enforces it — a value just outside is one KilnError naming the
flag, the value at the edge loads. Choices likewise. New tasks are covered as soon as they are registered.

Values are derived from each range's text (">= 1" -> 0 refused, 1 accepted), so the test holds for any range a
key is given; what it proves is that no declared range goes unchecked and no numeric key goes undeclared.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest

from kiln import tasks
from kiln.config import RunConfig, load_config
from kiln.config_loader import _BOUND, _INTERVAL
from kiln.errors import KilnError

VERBS = {"pretrain": RunConfig, **{kind: tasks.config_class(kind) for kind in tasks.CONFIGS}}


def _keys(cls, prefix=""):
    """(dotted key, field, python type) of every leaf key of a config class (nested dataclasses walked through
    their default instance, whose class a verb may specialise)."""
    instance, hints = cls(), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(type(value), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def _edges(spec: str, tp) -> tuple[list, list]:
    """(values outside the range, values inside it at or next to its edges) for a range spec."""
    step = 1 if tp is int else 0.5
    if spec == "any":
        return [], [-1.5 if tp is float else -1, 0]
    if m := _BOUND.match(spec):
        a = float(m.group(2))
        a = int(a) if tp is int else a
        return ([a - step, a], [a + step]) if m.group(1) == ">" else ([a - step], [a, a + step])
    m = _INTERVAL.match(spec)
    lo, hi = float(m.group(2)), float(m.group(3))
    inside = [v for v in (lo, hi, (lo + hi) / 2) if (v != lo or m.group(1) == "[") and (v != hi or m.group(4) == "]")]
    outside = [lo - step, hi + step] + ([lo] if m.group(1) == "(" else []) + ([hi] if m.group(4) == ")" else [])
    if tp is int:
        inside = [int(v) for v in inside if float(v).is_integer()]
        outside = [int(v) for v in outside if float(v).is_integer()]
    return outside, inside


CASES = [(verb, key, f, tp) for verb, cls in VERBS.items() for key, f, tp in _keys(cls)]
NUMERIC = [c for c in CASES if c[3] in (int, float)]


@pytest.mark.parametrize("verb,key,f,tp", NUMERIC, ids=[f"{c[0]}:{c[1]}" for c in NUMERIC])
def test_every_numeric_key_has_one_range_and_load_enforces_it(verb, key, f, tp):
    spec = f.metadata.get("range")
    assert spec, f"{verb}: {key} ({tp.__name__}) declares no range (metadata range=...; 'any' for any finite number)"
    outside, inside = _edges(spec, tp)
    if tp is float:
        outside += [math.nan, math.inf]
    for bad in outside:
        with pytest.raises(KilnError, match=rf"^--{re.escape(key)} must be .*got "):
            load_config(None, [f"--{key}", str(bad)], cls=VERBS[verb])
    for good in inside:
        cfg = load_config(None, [f"--{key}", str(good)], cls=VERBS[verb])
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value == good


CHOICES = [c for c in CASES if c[2].metadata.get("choices")]


@pytest.mark.parametrize("verb,key,f,tp", CHOICES, ids=[f"{c[0]}:{c[1]}" for c in CHOICES])
def test_every_choice_key_refuses_what_it_does_not_list(verb, key, f, tp):
    with pytest.raises(KilnError, match=rf"^command line: {re.escape(key)} must be "):
        load_config(None, [f"--{key}", "no-such-choice"], cls=VERBS[verb])
    for choice in f.metadata["choices"]:
        load_config(None, [f"--{key}", choice], cls=VERBS[verb])


def test_a_verb_accepts_only_its_components_keys_and_its_help_lists_them():
    """Pretraining's batch-in-tokens keys belong to pretraining's train config alone: a fine-tuning verb neither
    lists nor accepts them (no list of keys a verb must ignore), and each verb's --help rows are its keys."""
    pretrain = {k for k, _, _ in _keys(RunConfig)}
    assert {"train.batch_tokens", "train.lr_scaling", "train.sample_tokens", "train.lr"} <= pretrain
    for kind in tasks.CONFIGS:
        keys = {k for k, _, _ in _keys(VERBS[kind])}
        assert "train.batch_tokens" not in keys and "train.lr" in keys
        with pytest.raises(KilnError, match=r"^command line: unknown key 'train.batch_tokens'"):
            load_config(None, ["--train.batch_tokens", "4096"], cls=VERBS[kind])
        shown = {row[0][2:] for row in tasks.get(kind).help_rows()}
        assert {k for k in keys if not k.startswith("model.")} <= shown <= keys, kind  # model.*: from init


def test_an_older_run_folders_config_with_pretraining_keys_still_loads(tmp_path):
    """Older kiln wrote every train key into each run's config.yaml; those files load (the retired keys
    dropped), while the same keys on the command line stay unknown."""
    cls = VERBS["classify"]
    old = tmp_path / "classify.yaml"
    old.write_text("train:\n  lr: 2.0e-05\n  batch_tokens: 0\n  lr_scaling: none\n  eval_batches: 20\n"
                   "  sample_tokens: 0\n  sample_prompt: \"\\n\"\n")
    assert load_config(old, None, cls=cls).train.lr == 2e-5
    with pytest.raises(KilnError, match="unknown key 'train.eval_batches'"):
        load_config(old, ["--train.eval_batches", "3"], cls=cls)
