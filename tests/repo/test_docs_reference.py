"""docs/reference.md is what docs/gen_reference.py writes today: every verb's arguments and every config key of
every training verb, from the same sources as --help. A new key, a changed default or a new task without a
regenerated page fails here, with the command that fixes it."""

from __future__ import annotations

import importlib.util
import re

from conftest import ROOT
from kiln import tasks
from kiln.cli import build_parser
from kiln.cli_checks import subcommands


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_current():
    text = _generator().render()
    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == text, "docs/reference.md is out of date: run `.venv/bin/python docs/gen_reference.py`"


def _help_keys(*path: str) -> list[str]:
    """The config keys `kiln PATH --help` lists, read from its epilog."""
    parser = build_parser([*path, "--help"])
    for word in path:
        parser = subcommands(parser)[word]
    return re.findall(r"^  (--\S+)", parser.epilog or "", flags=re.M)


def test_the_reference_lists_what_help_lists():
    text = _generator().render()
    for verb in subcommands(build_parser([])):
        assert f"### kiln {verb}" in text, verb
    for path in [("pretrain",), *(("finetune", name) for name in tasks.REGISTRY)]:
        keys = _help_keys(*path)
        assert keys, path
        section = text.split(f"### kiln {' '.join(path)} keys")[1].split("\n### ")[0]
        assert re.findall(r"^\| `(--\S+)` \|", section, flags=re.M) == keys, path
