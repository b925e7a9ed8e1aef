"""train.trackers: the trainer's metrics go to MLflow and Weights & Biases besides metrics.csv, and a resumed run
logs on into the same tracked run. What each library stored is read back with its own client (MlflowClient) or
from its own files (the offline W&B run's .wandb log, read with wandb's protobuf records), never from kiln."""

from __future__ import annotations

import csv
import json
import os
import struct
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY, assert_user_error, run_until_crash
from kiln.cli import main
from kiln.config import load_config
from kiln.report.trackers import chosen

pytestmark = pytest.mark.usefixtures("one_thread")

# No network: the libraries' usage telemetry and error reports off (set before either is imported)
for _key, _value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "WANDB_ERROR_REPORTING": "false",
                     "WANDB_SILENT": "true", "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_META": "true",
                     "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(autouse=True)
def local_only(tmp_path, monkeypatch):
    """W&B's own settings and caches inside the test's folder; MLflow's default store (no MLFLOW_TRACKING_URI)."""
    for var, sub in (("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_ARTIFACT_DIR", "wandb-artifacts")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    for var in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)


def pretrain(corpus, out, *extra) -> list[str]:
    # 12 steps; checkpoints at 5, 10 (an eval) and 12 (an eval)
    return ["pretrain", "--data.source", str(corpus), "--out", str(out), *TINY, "--train.max_steps", "12",
            "--train.save_every", "5", *extra]


def csv_column(run: Path, key: str) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def crash_then_resume(corpus, run: Path, tracker: str, check_crashed) -> None:
    """Train until step 7 and die there (the last checkpoint is step 5: steps 6 and 7 were logged, then are
    trained again), check what the tracker holds, resume to the end."""
    run_until_crash(lambda: main(pretrain(corpus, run, "--train.trackers", tracker)), 7)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000005"
    check_crashed(json.loads((run / "trackers.json").read_text())[tracker])
    assert main(["pretrain", "--resume", str(run)]) == 0


def test_mlflow_logs_the_metrics_and_a_resume_continues_the_same_run(corpus, tmp_path):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    store = f"sqlite:///{run / 'mlruns' / 'mlflow.db'}"  # the default store: inside the run folder
    first: dict = {}

    def crashed(state):
        assert state["tracking_uri"] == store
        client = MlflowClient(store)
        first.update(state)
        assert client.get_run(state["run_id"]).info.status == "FAILED"
        assert [m.step for m in client.get_metric_history(state["run_id"], "loss")] == list(range(1, 8))

    crash_then_resume(corpus, run, "mlflow", crashed)
    state = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert state["run_id"] == first["run_id"]  # the same tracked run, reopened
    client = MlflowClient(store)
    tracked = client.get_run(state["run_id"])
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == run.name
    assert len(client.search_runs([tracked.info.experiment_id])) == 1
    for key in ("loss", "lr", "tokens", "val_loss"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], key))
        want = csv_column(run, key)
        assert [s for s, _ in history] == sorted(want), key  # every step once: 6 and 7 were not sent again
        assert [v for _, v in history] == pytest.approx([want[s] for s, _ in history], rel=1e-6), key
    params = tracked.data.params  # the config, logged once when the run began
    assert params["train.trackers"] == "mlflow" and params["model.n_layer"] == "2"
    assert params["train.max_steps"] == "12" and params["data.source"].endswith("corpus.txt")


# ---------------------------------------------------------------------------------------------- W&B offline


def wandb_records(path: Path):
    """The records of a .wandb file: wandb's LevelDB-style log (a 7-byte ':W&B' header, 32 KiB blocks of chunks
    with a 7-byte header: crc32, length, type full/first/middle/last), each record a wandb_internal Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # the rest of the block is padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def read_offline_run(folder: Path) -> dict:
    """What an offline run logged, once W&B's service has written all of it (run.finish() returns before the
    file is flushed: wait for the exit record)."""
    (log,) = folder.glob("run-*.wandb")
    for _ in range(300):
        out = _read_offline_log(log)
        if out["exit_code"] is not None:
            return out
        time.sleep(0.1)
    raise AssertionError(f"{log}: no exit record after 30 s")


def _read_offline_log(log: Path) -> dict:
    out = {"history": {}, "config": {}, "exit_code": None}
    for r in wandb_records(log):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["project"], out["name"] = r.run.run_id, r.run.project, r.run.display_name
            out["config"].update({_key(c): json.loads(c.value_json) for c in r.run.config.update})
        elif kind == "config":
            out["config"].update({_key(c): json.loads(c.value_json) for c in r.config.update})
        elif kind == "history":
            out["history"][r.history.step.num] = {_key(i): json.loads(i.value_json) for i in r.history.item}
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def test_wandb_offline_logs_the_metrics_and_a_resume_continues_the_same_run(corpus, tmp_path):
    run = tmp_path / "run"
    first: dict = {}

    def crashed(state):
        assert state["mode"] == "offline"
        (folder,) = (run / "wandb").glob("offline-run-*")
        first.update(state, folder=folder, run=read_offline_run(folder))

    crash_then_resume(corpus, run, "wandb", crashed)
    state = json.loads((run / "trackers.json").read_text())["wandb"]
    assert state["id"] == first["id"]
    folders = sorted((run / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    assert len(folders) == 2 and folders[0] == first["folder"]
    before, after = first["run"], read_offline_run(folders[1])
    assert before["id"] == after["id"] == state["id"]  # `wandb sync` uploads both into one W&B run
    assert before["project"] == "kiln" and before["name"] == run.name
    assert sorted(before["history"]) == list(range(1, 8)) and before["exit_code"] == 1
    assert sorted(after["history"]) == list(range(8, 13)) and after["exit_code"] == 0  # 6, 7 not sent again
    config = before["config"]  # the config, logged once when the run began
    assert config["train"]["trackers"] == "wandb" and config["model"]["n_layer"] == 2
    history = {**before["history"], **after["history"]}
    for key in ("loss", "lr", "tokens", "val_loss"):
        want = csv_column(run, key)
        got = {step: row[key] for step, row in history.items() if key in row}
        assert sorted(got) == sorted(want), key
        assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-6), key
    last = max(history)
    assert history[last]["loss"] == pytest.approx(csv_column(run, "loss")[12], rel=1e-6)


# ---------------------------------------------------------------------------------------------- the key


def test_the_trackers_key(tmp_path):
    assert load_config(None, ["--train.trackers", "mlflow, wandb"]).train.trackers == "mlflow,wandb"
    assert chosen(load_config(None, []).train) == ["tensorboard"]  # the default: what runs wrote before the key
    assert chosen(load_config(None, ["--train.trackers", "none"]).train) == []
    old = tmp_path / "old.yaml"  # a config.yaml written before train.trackers: tensorboard false still holds
    old.write_text(yaml.safe_dump({"train": {"max_steps": 3, "tensorboard": False}}))
    assert chosen(load_config(old, None).train) == []
    both = load_config(None, ["--train.trackers", "tensorboard,mlflow", "--train.tensorboard", "false"]).train
    assert chosen(both) == ["mlflow"]
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump({"train": {"trackers": ["wandb", "tensorboard"]}}))
    assert load_config(listed, None).train.trackers == "wandb,tensorboard"


def test_a_bad_tracker_or_mode_is_one_line(capsys, corpus, tmp_path):
    err = assert_user_error(capsys, pretrain(corpus, tmp_path / "a", "--train.trackers", "tensorboard,mlfow"),
                            "train.trackers", "'mlfow'", "did you mean 'mlflow'")
    assert "tensorboard, mlflow, wandb, none" in err
    assert_user_error(capsys, pretrain(corpus, tmp_path / "b", "--train.wandb_mode", "onlin"), "train.wandb_mode")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"trackers": ["wandb", "comet"]}}))
    assert_user_error(capsys, ["pretrain", bad, "--data.source", corpus, "--out", tmp_path / "c"], "'comet'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused before any work


def test_a_missing_library_is_one_line(capsys, corpus, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert_user_error(capsys, pretrain(corpus, tmp_path / "run", "--train.trackers", "tensorboard,wandb"),
                      "train.trackers wandb needs wandb: pip install 'kiln[wandb]'")


def test_the_params_are_the_config_file_the_run_json_names(tmp_path):
    from kiln.report.trackers import flatten, run_params

    (tmp_path / "run.json").write_text(json.dumps({"kind": "classify", "config": "classify.yaml"}))
    (tmp_path / "classify.yaml").write_text(yaml.safe_dump({"epochs": 3.0, "train": {"lr": 5e-5, "trackers": "mlflow"},
                                                           "data": {"columns": ["text", "label"]}}))
    params = flatten(run_params(tmp_path, load_config(None, []).train))
    assert params == {"epochs": "3.0", "train.lr": "5e-05", "train.trackers": "mlflow",
                      "data.columns": '["text", "label"]'}
