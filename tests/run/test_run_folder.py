"""The run folder (kiln.run): one writer at a time, stale locks taken over, run.json and the fallback for
folders made before it, and one loader for every kind of run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY, assert_user_error
from kiln.errors import KilnError
from kiln.run.folder import LOCK, RunLock, read_run_json


def popen(*args):
    return subprocess.Popen([sys.executable, "-m", "kiln", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, timeout=600):
    deadline = time.time() + timeout  # an upper bound for a loaded machine, not a timing assertion
    while time.time() < deadline and not path.exists():
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


def test_two_writers_on_one_run_folder_exactly_one_runs(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--data.source", corpus, "--out", run, *TINY, "--train.max_steps", "40"]
    first = popen(*args)
    time.sleep(0.3)  # the second starts within 0.5 s of the first
    second = popen(*args)
    results = [p.communicate(timeout=600) + (p.returncode,) for p in (first, second)]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[2] == 2)
    err = loser[1].strip()
    assert err.startswith("kiln: error:") and "\n" not in err and "Traceback" not in err, err
    assert str(run) in err and ("being written by process" in err or "already holds checkpoints" in err), err
    log = (run / "log.txt").read_text()
    assert log.count("kiln pretrain ->") == 1  # the refused one wrote nothing, not even a log line
    assert not (run / LOCK).exists()  # released by the winner at the end


def test_a_resume_while_the_run_is_going_is_refused_and_a_stale_lock_is_taken_over(corpus, tmp_path):
    run = tmp_path / "run"
    proc = popen("pretrain", "--data.source", corpus, "--out", run, *TINY, "--train.max_steps", "100000",
                 "--train.save_every", "2", "--train.eval_every", "1000")
    wait_for(run / "checkpoints" / "latest")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts
              and p.name not in ("metrics.csv", "log.txt")}
    busy = subprocess.run([sys.executable, "-m", "kiln", "pretrain", "--resume", str(run), "--train.max_steps", "5"],
                          capture_output=True, text=True, timeout=600)
    assert busy.returncode == 2, busy.stderr
    assert f"process {proc.pid}" in busy.stderr and "Traceback" not in busy.stderr
    proc.send_signal(signal.SIGKILL)  # dies holding the lock
    proc.wait()
    assert json.loads((run / LOCK).read_text())["pid"] == proc.pid
    assert {p: p.read_bytes() for p in before} == before  # the refused resume changed nothing
    step = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    done = subprocess.run([sys.executable, "-m", "kiln", "pretrain", "--resume", str(run), "--train.max_steps",
                           str(step + 2)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"taking over the stale lock of process {proc.pid}" in done.stdout + done.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step + 2:06d}"
    assert not (run / LOCK).exists()


def test_lock_names_a_live_holder_and_is_reentrant_in_one_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "since": "now"}))
        with pytest.raises(KilnError, match=f"being written by process {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / LOCK).unlink()
    lock = RunLock(tmp_path).acquire()
    assert RunLock(tmp_path).acquire().held  # the same process again (an API call inside a CLI call)
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_run_json_names_the_kind_and_old_folders_without_it_still_load(corpus, tmp_path, capsys):
    from kiln.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--data.source", str(corpus), "--out", str(run), *TINY, "--train.max_steps", "3"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "pretrain" and info["config"] == "config.yaml" and info["kiln"] and info["torch"]
    (run / "run.json").unlink()  # a run folder made before run.json existed
    assert read_run_json(run)["kind"] == "pretrain"
    capsys.readouterr()
    assert main(["eval", str(run), str(corpus)]) == 0
    assert "perplexity" in capsys.readouterr().out
    (run / "run.json").write_text("not json")
    assert_user_error(capsys, ["eval", str(run), str(corpus)], "run.json")
