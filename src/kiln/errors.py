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


# ------------------------------------------------------------------------------------ the machine's trouble

# errno values that are the machine's or the user's trouble (a full or read-only disk, a path that is not a
# folder, no permission), never a bug in kiln: the CLI reports them in one line, exit 2
FILESYSTEM_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENOTDIR", "EISDIR", "ENOENT", "EEXIST",
                     "ENAMETOOLONG", "EFBIG", "EMFILE", "ENFILE", "EIO", "ELOOP", "ETXTBSY", "EXDEV"}
_WRITE_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EFBIG"}
_PATH_LOCALS = ("filename", "file", "f", "path", "tmp", "out", "dst", "target", "final")


def _errno_name(code: int | None) -> str | None:
    import errno

    return errno.errorcode.get(code) if code is not None else None


def _os_error_code(e: BaseException) -> int | None:
    """errno of a write that failed inside a library that does not raise OSError with one (or -1 when the
    library only says that fewer bytes were written): safetensors, torch.save, numpy's tofile."""
    import errno
    import re

    text = str(e)
    if m := re.search(r"os error (\d+)", text):  # safetensors (Rust io::Error)
        return int(m.group(1))
    if m := re.search(r"\[Errno (\d+)\]", text):
        return int(m.group(1))
    if isinstance(e, OSError) and re.search(r"\d+ requested and \d+ written", text):  # numpy tofile
        return -1
    if type(e).__name__ == "RuntimeError" and re.search(r"inline_container|PytorchStreamWriter|file write failed",
                                                        text):  # torch.save's zip writer
        return -1
    return errno.ENOSPC if "No space left on device" in text else None


def _path_from_traceback(e: BaseException) -> str | None:
    """The file being written when `e` was raised: the innermost frame holding an open file object or a
    path-like local (torch.save's `f`, safetensors' `filename`, a `with open(...) as f`)."""
    import io
    import os
    import traceback

    frames = [frame for frame, _ in traceback.walk_tb(e.__traceback__)]
    for frame in reversed(frames):
        local = frame.f_locals
        owner = vars(local["self"]).values() if hasattr(local.get("self"), "__dict__") else ()
        for v in [*local.values(), *owner]:  # a file object, or one the method's object holds (self._f)
            if isinstance(v, io.IOBase) and isinstance(getattr(v, "name", None), str) and not v.name.startswith("<"):
                return v.name
        for name in _PATH_LOCALS:
            v = local.get(name)
            if isinstance(v, (str, os.PathLike)) and (os.sep in str(v) or os.path.splitext(str(v))[1]):
                return str(v)
    return None


_VERB_WRITES = {"pretrain": "writing the run folder", "distill": "writing the run folder",
                "finetune classify": "writing the run folder", "finetune seq2seq": "writing the run folder",
                "data prepare": "writing the prepared data", "eval": "writing evaluation results",
                "predict": "writing predictions", "translate": "writing outputs", "prune": "writing the new run folder",
                "quantize": "writing the new run folder", "export": "writing the exported model",
                "import": "writing the imported run", "viz attention": "writing a plot",
                "viz compare": "writing a plot"}


def _what(path: str, verb: str) -> str:
    """What kiln was writing, told by the path, else by the verb."""
    parts, name = path.replace("\\", "/").split("/"), _basename(path)
    if "checkpoints" in parts:
        return "saving a checkpoint"
    if name.startswith("metrics"):
        return "writing metrics"
    if name.endswith(".png") or "plots" in parts:
        return "writing a plot"
    if "predictions" in parts:
        return "writing predictions"
    if name.endswith(".bin") or name == "manifest.json":
        return "writing token shards"
    if name == "tokenizer.json":
        return "writing the tokenizer"
    if name == "log.txt":
        return "writing the run log"
    if "tfevents" in name:
        return "writing TensorBoard events"
    return _VERB_WRITES.get(verb, "writing")


def _basename(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _file_in_the_way(path: str) -> str | None:
    """The first part of `path` that exists but is not a folder (a file where kiln needs a folder)."""
    import os

    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        p = os.sep.join(parts[:i])
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
        if not os.path.lexists(p):
            return None
    return None


def filesystem_error(e: BaseException, verb: str = "", after=None) -> str | None:
    """One line for a failed read or write of a file (full disk, read-only file system, a file where a folder
    should be, no permission), naming the path, the reason and what kiln was doing; None when `e` is not one.
    `after(path, verb)`: text appended to the line (the CLI passes how to resume the run)."""
    import os

    code = e.errno if isinstance(e, OSError) and e.errno is not None else _os_error_code(e)
    if code is None:
        return None
    name = _errno_name(code)
    if code != -1 and name not in FILESYSTEM_ERRNOS:
        return None
    path = getattr(e, "filename", None) or _path_from_traceback(e)
    if path is None:
        return None
    path = os.fsdecode(path)
    second = getattr(e, "filename2", None)
    target = f"{path} -> {os.fsdecode(second)}" if second else path
    action = "cannot write" if name in _WRITE_ERRNOS or code == -1 else "cannot open"
    reason = os.strerror(code) if code != -1 else ""
    if code == -1:  # the library only says the write was short: tell a full disk when it is one
        try:
            import shutil

            parent = path
            while parent and not os.path.isdir(parent):
                parent = os.path.dirname(parent)
            full = shutil.disk_usage(parent or ".").free < (1 << 20)
        except OSError:
            full = False
        name = "ENOSPC" if full else None
        reason = os.strerror(28) if full else f"the write failed ({str(e).splitlines()[0][:120]})"
    elif name in ("ENOTDIR", "EEXIST") and (blocker := _file_in_the_way(path)):
        action, reason = "cannot write", ("it" if blocker == path else blocker) + " is a file, not a folder"
    elif name == "EISDIR":
        reason = "it is a folder, not a file"
    elif name == "ENOENT" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        missing = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(os.path.dirname(missing)):
            missing = os.path.dirname(missing)
        reason = f"the folder {missing} does not exist"
    elif name == "ENOENT" or (name in ("EACCES", "EPERM") and os.path.exists(path) and not os.access(path, os.R_OK)):
        action = "cannot read"  # a missing file in a folder that exists was to be read
    elif name in ("EACCES", "EPERM"):
        action = "cannot write"  # a readable file or a path not there yet: it was to be written
    hint = {"ENOSPC": "; free some space", "EDQUOT": "; free some space (disk quota)",
            "EROFS": "; choose a writable place"}.get(name, "")
    doing = _what(path, verb) if action == "cannot write" else ""
    doing = ", ".join(filter(None, (f"kiln {verb}" if verb else "", doing))) or "kiln"
    return f"{action} {target}: {reason} ({doing}){hint}{after(path, verb) if after else ''}"
