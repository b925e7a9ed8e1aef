"""The `kiln` command's user-error contract, apart from its verb table (kiln/cli.py): argparse's errors as one
line with "did you mean", the checks made before torch is imported (a run folder that is not there, a resume of
a run another process writes), the hint that names a resume after a full disk, and torchrun's error file. With
them, the config overrides taken out of the command line (split_overrides): the flags `unrecognized` knows too.
"""

from __future__ import annotations

import argparse
import os

from kiln.errors import KilnError, did_you_mean


class Parser(argparse.ArgumentParser):
    """argparse with kiln's error contract: one line (no usage block), exit 2; a wrong verb or choice gets "did
    you mean", and every message says where the usage is. Sub-commands inherit it (add_subparsers)."""

    def error(self, message: str):
        import re

        hint = ""
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            hint = did_you_mean(m.group(1), re.findall(r"'([^']*)'", m.group(2)))
        self.exit(2, f"{self.prog}: error: {message}{hint} (usage: {self.prog} --help)\n")


def torchrun_error_file(message: str) -> None:
    """Under torchrun, hand the one-line error to its failure report (the file torch's @record would write),
    so the report's "Root Cause" shows kiln's message instead of "error_file: <N/A>"."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": f"kiln: error: {message}",
                                   "extraInfo": {"py_callstack": f"kiln: error: {message} (exit code 2)",
                                                 "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


RECIPE_VERBS = ("pretrain", "data", "finetune", "distill")  # these take --section.key VALUE config overrides


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull config overrides (--section.key VALUE, --section.key=VALUE, --seed 3) out of argv."""
    from dataclasses import fields

    from kiln.config import RunConfig

    top = {f.name for f in fields(RunConfig)} - {"out"}
    if argv[:2] == ["data", "prepare"]:
        top.discard("out")
    elif argv[:1] == ["finetune"]:
        from kiln import tasks

        top = {f.name for f in fields(tasks.config_class(argv[1]))} if argv[1:2] and argv[1] in tasks.REGISTRY \
            else set()
    elif argv[:1] in (["pretrain"], ["distill"]):
        top.add("out")
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and ("." in key or key in top):
            if "=" in arg or i + 1 >= len(argv):
                overrides.append(arg)
            else:
                overrides += [arg, argv[i + 1]]
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's sub-commands by name ({} for a leaf). argparse has no public way to list them."""
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(action.choices) if action is not None else {}


def unrecognized(parser: argparse.ArgumentParser, args, unknown: list[str]):
    """argparse's "unrecognized arguments", named by the command they were given to, with its closest flag."""
    names, sub = ["kiln"], parser
    for dest in ("verb", "finetune_verb", "data_verb", "viz_verb"):
        name = getattr(args, dest, None)
        if name is None or name not in subcommands(sub):
            continue
        names.append(name)
        sub = subcommands(sub)[name]
    flags = set(sub._option_string_actions)
    verb = names[1] if len(names) > 1 else ""
    if verb in ("pretrain", "data", "distill") or (verb == "finetune" and len(names) > 2):
        from dataclasses import fields

        from kiln import tasks
        from kiln.config import RunConfig

        cls = tasks.config_class(names[2]) if verb == "finetune" else RunConfig
        flags |= {f"--{f.name}" for f in fields(cls)}  # the recipe's top-level keys (--seed, --name, --epochs, ...)
    flag = next((u.split("=")[0] for u in unknown if u.startswith("-")), "")
    hint = did_you_mean(flag, flags) if flag else ""
    sub.exit(2, f"{' '.join(names)}: error: unrecognized arguments: {' '.join(unknown)}{hint} "
                f"(usage: {' '.join(names)} --help)\n")


def resume_hint(path: str, verb: str) -> str:
    """For a training run: the last complete checkpoint is intact and how to continue from it."""
    if verb != "pretrain" and not verb.startswith("finetune "):
        return ""
    parts = path.replace("\\", "/").split("/")
    if "checkpoints" in parts:
        run_dir = "/".join(parts[:len(parts) - 1 - parts[::-1].index("checkpoints")]) or "."
    else:
        run_dir = path.rsplit("/", 1)[0] if "/" in path else "."
    try:
        from kiln.run.checkpoint import find_checkpoint

        ckpt = find_checkpoint(run_dir)
    except Exception:  # no run folder there, or no complete checkpoint: no hint
        return ""
    return f"; the last complete checkpoint ({ckpt.name}) is intact: kiln {verb} --resume {run_dir}"


def refuse_a_busy_resume(resume: str | None) -> None:
    """A resume of a run another process is writing: refused at once (the trainer's lock would refuse it after
    the imports). Rank 0 only: under torchrun the other ranks may find rank 0 already holding it."""
    from kiln.train.scaling import env_world

    if resume is not None and env_world()[0] == 0:
        from pathlib import Path

        from kiln.run.folder import RunLock

        RunLock(Path(resume)).check()


def require_run_folders(args) -> None:
    """A run folder that is not there: one line at once, not after ~3 s of importing torch and the verb's code."""
    from pathlib import Path

    run_dir = getattr(args, "run_dir", None)
    if run_dir is None or args.verb == "import":  # `kiln import hf SRC RUN_DIR` creates it
        return
    for part in str(run_dir).split(",") if args.verb in ("predict", "eval") else [str(run_dir)]:  # ensembles
        if part and not Path(part).exists():
            raise KilnError(f"run folder not found: {part}")
