"""The layer rule, checked on every import statement in src/kiln (function-local ones included).

A module may import only from its own layer group or from layers below it; siblings in one layer (model, data,
report) do not import each other. The order, lowest first, is in LAYERS; docs/architecture.md explains it.
A failure names the offending edge: file:line, the importing module, the imported one and both layers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"

# (layer, sibling groups of module prefixes) from the bottom up: a module imports its own group and the layers
# below; sibling groups of one layer stay independent of each other
LAYERS = [
    ("leaves", [["kiln._version", "kiln.errors", "kiln.constants", "kiln.hardware", "kiln.model.config"]]),
    # the components' configs sit beside their code but import only config_loader: the config layer composes them
    ("config", [["kiln.config_loader", "kiln.config", "kiln.train.config", "kiln.run.config", "kiln.report.config",
                 "kiln.model.lora_config"]]),
    ("model | data | report", [["kiln.model"], ["kiln.data"], ["kiln.report"]]),
    ("run", [["kiln.run"]]),
    ("train", [["kiln.train"]]),
    ("eval | interop | compress", [["kiln.eval"], ["kiln.interop"], ["kiln.compress"]]),
    ("tasks", [["kiln.tasks"]]),
    ("serve", [["kiln.serve"]]),
    ("api", [["kiln.api"]]),
    ("cli", [["kiln.cli", "kiln.cli_checks", "kiln.cli_verbs", "kiln.__main__"]]),
]
# the package root is the public face (lazy attributes from kiln.api); it may only be imported for
# `kiln.__version__`-free names by the faces themselves
ROOT = "kiln"


def _where(module: str) -> tuple[int, str]:
    """(layer index, sibling group index) of a module: the longest matching prefix wins."""
    best, length = None, -1
    for i, (_, groups) in enumerate(LAYERS):
        for g, prefixes in enumerate(groups):
            for p in prefixes:
                if (module == p or module.startswith(p + ".")) and len(p) > length:
                    best, length = (i, g), len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/repo/test_layers.py"
    return best


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(line, imported module) of every import in the file, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            subs = [f"{name}.{a.name}" for a in node.names if _is_module(f"{name}.{a.name}")]
            if len(subs) < len(node.names):  # names defined in `name` itself
                yield node.lineno, name
            for sub in subs:  # `from kiln.data import tables` imports the module kiln.data.tables
                yield node.lineno, sub


def _is_module(name: str) -> bool:
    path = SRC / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def edges():
    for path in sorted((SRC / "kiln").rglob("*.py")):
        src = _module_name(path)
        for line, target in _imports(path):
            if target == ROOT or target.startswith(ROOT + "."):
                yield path, line, src, target


def test_every_import_respects_the_layer_order():
    bad = []
    for path, line, src, target in edges():
        if src == ROOT:  # the package face: lazy attributes from the API
            continue
        if target == ROOT:
            bad.append(f"{path.relative_to(SRC)}:{line}: {src} imports the package root `kiln` (import from the "
                       "module that defines the name instead)")
            continue
        (i, sib_s), (j, sib_t) = _where(src), _where(target)
        if j > i:
            bad.append(f"{path.relative_to(SRC)}:{line}: {src} [{LAYERS[i][0]}] imports {target} [{LAYERS[j][0]}], "
                       "a higher layer")
        elif j == i and sib_s != sib_t:
            bad.append(f"{path.relative_to(SRC)}:{line}: {src} imports its sibling {target} (layer {LAYERS[i][0]}: "
                       "siblings stay independent)")
    assert not bad, "layer rule broken:\n  " + "\n  ".join(bad)


def test_modules_form_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for path, _, src, target in edges():
        if src != ROOT and target != ROOT:
            graph.setdefault(src, set()).add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_import_kiln_loads_no_task_trainer_or_transformers_module():
    code = ("import sys, kiln; heavy = [m for m in sys.modules if m.startswith(('kiln.tasks', 'kiln.train', "
            "'transformers', 'torch'))]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_the_checker_sees_a_violation_and_names_the_edge(tmp_path, monkeypatch):
    """The rule must be able to fail: an upward import planted in a copy of a leaf module is reported."""
    bad = SRC / "kiln" / "model" / "_layer_rule_probe.py"
    bad.write_text("def f():\n    from kiln.train.trainer import Trainer\n    return Trainer\n")
    try:
        try:
            test_every_import_respects_the_layer_order()
        except AssertionError as e:
            assert "kiln/model/_layer_rule_probe.py:2: kiln.model._layer_rule_probe [model | data | report] imports " \
                   "kiln.train.trainer [train]" in str(e)
        else:
            raise AssertionError("the planted upward import was not reported")
    finally:
        bad.unlink()
