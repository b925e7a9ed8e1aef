"""The run folder: naming, creating (refusing one that already holds a run), the writer's lock, run.json, the log.

    run_dir/
      run.json        kind (pretrain | classify | seq2seq | ...), config file, kiln/torch versions, task metadata
      .lock           pid, host and start time of the one process writing the folder (gone when it ends)
      log.txt         everything the run printed
      config.yaml | classify.yaml | seq2seq.yaml, tokenizer.json, checkpoints/, metrics.csv, plots/, eval/

Every verb that writes a run goes through `create_run` (a new run) or `open_run(..., write=True)` (a resume):
both take the lock before anything is written, so a second writer is refused before it touches the folder.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from kiln._version import __version__
from kiln.errors import KilnError

RUN_JSON, LOCK = "run.json", ".lock"
# run folders made before run.json existed: their kind is told by the config file they hold
LEGACY_CONFIG_FILES = (("classify.yaml", "classify"), ("seq2seq.yaml", "seq2seq"), ("config.yaml", "pretrain"))


class RunLog:
    """Print to the console and append to run_dir/log.txt."""

    def __init__(self, run_dir: Path | None = None, quiet: bool = False):
        self.file = open(Path(run_dir) / "log.txt", "a", encoding="utf-8") if run_dir else None
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def default_run_dir(name: str, out: str = "") -> Path:
    """`out` when given, else runs/<name>-<timestamp>."""
    return Path(out) if out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def holds_run(run_dir: Path) -> bool:
    """A folder holds a run once it has checkpoints (one that died before its first may be started again)."""
    return (Path(run_dir) / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------- the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _held_by_another(holder: dict) -> bool:
    """A lock file's holder is a live process other than this one (one on another host counts as live)."""
    pid, host = int(holder.get("pid", 0) or 0), holder.get("host", "")
    if not holder or (host == socket.gethostname() and pid == os.getpid()):
        return False
    return host != socket.gethostname() or _alive(pid)


class RunLock:
    """An exclusive lock file in the run folder: created with O_EXCL (atomic on local filesystems), holding the
    writer's pid and host. A lock left by a process that died (same host, pid gone) is taken over, with a
    message; a live holder makes `acquire` raise a KilnError naming it. Released at exit."""

    def __init__(self, run_dir: Path, log=print):
        self.path, self.log, self.held = Path(run_dir) / LOCK, log, False

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.path)
                pid, host = int(holder.get("pid", 0) or 0), holder.get("host", "")
                if host == me["host"] and pid == me["pid"]:
                    self.held = True  # this process holds it already (an API call inside a CLI call)
                    return self
                if not holder and time.time() - _mtime(self.path) < 5:
                    time.sleep(0.2)  # a writer between creating the file and filling it
                    continue
                if _held_by_another(holder):
                    raise self._busy(holder)
                self.log(f"note: taking over the stale lock of process {pid or '?'} on {host or '?'} "
                         f"(no longer running): {self.path}")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise KilnError(f"cannot take the lock {self.path}: another process keeps taking it")

    def check(self) -> None:
        """Raise acquire's error if another live process holds the lock now; change nothing (a cheap early look,
        e.g. before a resume imports torch; acquire stays the real test)."""
        holder = _read_lock(self.path) if self.path.is_file() else {}
        if _held_by_another(holder):
            raise self._busy(holder)

    def _busy(self, holder: dict) -> KilnError:
        return KilnError(f"run folder {self.path.parent} is being written by process {holder.get('pid', 0)} on "
                         f"{holder.get('host', '')} (since {holder.get('since', '?')}; lock {self.path}); wait for it "
                         "to finish, or use another --out")

    def release(self) -> None:
        if self.held and _read_lock(self.path).get("pid") == os.getpid():
            try:
                self.path.unlink()
            except OSError:
                pass
        self.held = False


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ----------------------------------------------------------------------------------------------- create / open


def create_run(run_dir: Path, kind: str, log=print, resume_hint: bool = False) -> RunLock:
    """Create a new run folder (or adopt an empty/partial one without checkpoints) and lock it. Refuses a folder
    that already holds a run, before writing anything."""
    run_dir = Path(run_dir)
    if holds_run(run_dir):
        hint = f"use --resume {run_dir} or another --out" if resume_hint else "pick another --out"
        raise KilnError(f"run folder {run_dir} already holds checkpoints; {hint}")
    if run_dir.exists() and not run_dir.is_dir():
        raise KilnError(f"run folder {run_dir} is a file, not a folder; pick another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir, log).acquire()
    if holds_run(run_dir):  # another writer got here between the check and the lock
        lock.release()
        raise KilnError(f"run folder {run_dir} already holds checkpoints; pick another --out")
    return lock


def write_run_json(run_dir: Path, kind: str, config_file: str, **meta) -> dict:
    """run.json: what kind of run this is and what made it. Tasks add their own metadata (labels, codec)."""
    import torch

    info = {"kind": kind, "config": config_file, "kiln": __version__, "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
    from kiln.run.checkpoint import atomic_write_text

    atomic_write_text(Path(run_dir) / RUN_JSON, json.dumps(info, indent=2) + "\n")
    return info


def read_run_json(run_dir: Path) -> dict:
    """The run's run.json; for folders made before it existed, the kind told by the config file they hold."""
    run_dir = Path(run_dir)
    f = run_dir / RUN_JSON
    if f.is_file():
        try:
            info = json.loads(f.read_text(encoding="utf-8"))
            if isinstance(info, dict) and "kind" in info:
                return info
        except (OSError, ValueError):
            pass
        raise KilnError(f"{f}: not a readable run.json (expected a JSON object with a 'kind')")
    for name, kind in LEGACY_CONFIG_FILES:
        if (run_dir / name).is_file():
            return {"kind": kind, "config": name}
    if not run_dir.exists():
        raise KilnError(f"run folder not found: {run_dir}")
    raise KilnError(f"{run_dir} is not a kiln run folder (no run.json, config.yaml, classify.yaml or seq2seq.yaml)")


def run_kind(run_dir: Path) -> str:
    return read_run_json(run_dir)["kind"]
