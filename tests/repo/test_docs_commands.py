"""Every `kiln ...` command that kiln tells a user to run exists as written: the commands in the examples of
README and every page under docs/ (getting started, the guides, the reference, architecture) and in the error
messages, hints and docstrings of src/kiln. A hint that names a
verb, a sub-command, a flag or a config key the CLI does not have sends the user from one error to another (an
error message once said "run `kiln prepare` first"; the verb is `kiln data prepare`)."""

from __future__ import annotations

import argparse
import re
import shlex

from conftest import ROOT
from kiln import tasks
from kiln.cli import build_parser
from kiln.cli_checks import subcommands
from kiln.config import RunConfig, config_help

HYPOTHETICAL_TASKS = {"mytask"}  # docs/architecture.md's "how to add a task" walk-through names a task to be written


def _spans(text: str) -> list[str]:
    """`kiln ...` in backticks, and the command lines of fenced code blocks (continuation lines joined)."""
    found = [m.group(1) for m in re.finditer(r"`(kiln [^`\n]+)`", text)]
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.match(r"\s*(?:\$ )?(?:.* -m )?(kiln (?:[a-z]|--|-h).*)", line.split(" # ")[0].split("   #")[0])
            if m:
                found.append(m.group(1))
    return found


def commands() -> list[tuple[str, str]]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "src" / "kiln").rglob("*.py"))]
    out = []
    for f in files:
        for cmd in _spans(f.read_text()):
            out.append((str(f.relative_to(ROOT)), cmd.strip().rstrip(".,;:")))
    return out


def _check_key(cls, key: str) -> str | None:
    """None if --KEY (top-level or section.key) is a key of config class `cls` (as `--help` lists them), else what
    is wrong."""
    keys = {flag[2:] for flag, _, _ in config_help(cls)}
    top, _, rest = key.partition(".")
    if top not in {k.split(".")[0] for k in keys}:
        return f"no config key {top!r}"
    if key not in keys:
        return f"no key {rest!r} in section {top!r}"
    return None


def check(cmd: str) -> str | None:
    """None if `cmd` names what the CLI has, else the first thing it does not."""
    cmd = re.sub(r"\{[^}]*\}", "X", cmd)  # f-string fields
    words = [w for w in shlex.split(cmd.replace("[", " ").replace("]", " "))[1:] if w != "..."]
    p, names = build_parser(words), ["kiln"]
    while words and not words[0].startswith("-") and (sub := subcommands(p)):
        word = words.pop(0)
        if word.isupper() or word in HYPOTHETICAL_TASKS:  # a placeholder (NAME, TASK): nothing more to check
            return None
        for alternative in re.split(r"[|/]", word):
            if alternative not in sub:
                return f"{' '.join(names)} has no {alternative!r} (it has {', '.join(sub)})"
        if "/" in word:  # prose listing several verbs ("kiln eval/predict/serve")
            return None
        names.append(word.split("|")[0])
        p = sub[names[-1]]
    verb = names[1:2]
    cls = tasks.config_class(names[2]) if verb == ["finetune"] and len(names) > 2 else \
        RunConfig if verb in (["pretrain"], ["distill"], ["data"]) else None
    positionals = [a for a in p._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("-") and not re.fullmatch(r"-?\d[\d.e-]*", word):
            flag = word.split("=")[0]
            action = p._option_string_actions.get(flag)
            if action is None and flag != "--section.key":  # the generic override, as usage lines write it
                problem = _check_key(cls, flag[2:]) if cls and flag.startswith("--") else "no such flag"
                if problem:
                    return f"{' '.join(names)} {flag}: {problem}"
                i += 2 if "=" not in word else 1
                continue
            i += 1 if "=" in word or (action and action.nargs == 0) else 2
            continue
        if positionals:
            action = positionals.pop(0)
            if action.choices and not word.isupper():
                bad = [w for w in word.split("|") if w not in action.choices]
                if bad:
                    return f"{' '.join(names)} {action.dest} {bad[0]!r}: not one of {', '.join(action.choices)}"
        i += 1
    return None


def test_the_documented_commands_were_found():
    found = commands()
    where = {f for f, _ in found}
    assert "README.md" in where and "docs/architecture.md" in where and "src/kiln/data/shards.py" in where
    assert "docs/getting-started.md" in where and "docs/reference.md" in where
    verbs = {c.split()[1] for _, c in found if len(c.split()) > 1}
    assert {"pretrain", "data", "finetune", "eval", "predict", "export", "import", "serve", "generate"} <= verbs
    assert len(found) > 100, len(found)


def test_the_checker_catches_what_does_not_exist():
    assert check("kiln prepare") and "has no 'prepare'" in check("kiln prepare")
    assert "no such flag" in check("kiln generate RUN --temprature 0")
    assert "no key 'lrr' in section 'train'" in check("kiln pretrain --train.lrr 1e-3")
    assert "no config key 'epochz'" in check("kiln finetune classify --epochz 3")
    assert "not one of hf, onnx, peft, gguf" in check("kiln export tflite RUN OUT")
    assert check("kiln finetune classify --epochs 3 --data.train x.csv --init RUN") is None
    assert check("kiln export onnx RUN_DIR OUT [--int8] [--checkpoint best|latest|DIR]") is None


def test_every_documented_command_exists():
    problems = [f"{where}: `{cmd}`: {problem}" for where, cmd in commands() if (problem := check(cmd))]
    assert not problems, "\n".join(problems)
