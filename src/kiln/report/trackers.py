"""Report sinks (`train.trackers`): where the trainer's metrics go besides metrics.csv.

    tensorboard  events/ in the run folder (when tensorboard is installed; CSV only otherwise)
    mlflow       a run in an MLflow tracking store: train.mlflow_uri, else $MLFLOW_TRACKING_URI, else
                 sqlite:///<run folder>/mlruns/mlflow.db (artifacts beside it: the run folder holds all of it)
    wandb        a Weights & Biases run in project train.wandb_project; train.wandb_mode offline (the default) needs
                 no account and writes <run folder>/wandb/offline-run-*, uploaded later by `wandb sync`

Each sink is a Tracker: log(step, metrics) and close(status). A tracker's library is imported only when it is
chosen. Only rank 0 opens them (the trainer's metrics log lives there). A new run logs its config (config.yaml,
flattened to dotted keys) as the tracked run's parameters; the tracked run's id goes to <run folder>/trackers.json,
and a resumed kiln run (--resume) reopens that run and logs on into it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Protocol

import yaml

from kiln.errors import KilnError, require

STATE_FILE = "trackers.json"  # {"mlflow": {"run_id": ..., "tracking_uri": ...}, "wandb": {"id": ..., ...}}


class Tracker(Protocol):
    purges: bool  # does reopening it drop what was logged after the checkpoint resumed from (TensorBoard does)

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self, status: str = "finished") -> None: ...  # finished | failed | killed (a signal)


def chosen(cfg) -> list[str]:
    """The trackers train.trackers names, "none" dropped; tensorboard also off with train.tensorboard false."""
    names = [n.strip() for n in str(cfg.trackers).split(",") if n.strip() not in ("", "none")]
    return [n for n in dict.fromkeys(names) if n != "tensorboard" or cfg.tensorboard]


def check_installed(cfg) -> None:
    """A one-line KilnError when a chosen tracker's library is missing (cheap: no import; every rank alike)."""
    import importlib.util

    for name in chosen(cfg):
        if name in ("mlflow", "wandb") and importlib.util.find_spec(name) is None:
            raise KilnError(f"train.trackers {name} needs {name}: pip install 'kiln[{name}]'")


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_params(run_dir: Path, cfg) -> dict:
    """The run's config as the tracked run's parameters: the config file its driver wrote (run.json names it:
    config.yaml, classify.yaml, ...), else the train.* keys the trainer has."""
    import dataclasses

    try:
        name = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8")).get("config") or "config.yaml"
    except (OSError, ValueError, AttributeError):
        name = "config.yaml"
    try:
        data = yaml.safe_load((Path(run_dir) / name).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    except (OSError, yaml.YAMLError):
        pass

    return {"train": dataclasses.asdict(cfg)} if dataclasses.is_dataclass(cfg) else {}


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


# ------------------------------------------------------------------------------------------------ the sinks


class TensorBoardTracker:
    name, purges = "tensorboard", True

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, run_dir: Path, resume_step: int | None) -> "TensorBoardTracker | None":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: CSV only (the default tracker, so no error)
            return None
        return cls(SummaryWriter(str(Path(run_dir) / "events"), purge_step=resume_step))

    def state(self) -> dict | None:
        return None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self, status: str = "finished") -> None:
        self.writer.close()


def run_folder_store(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlruns' / 'mlflow.db').resolve()}"


class MLflowTracker:
    """A run in an MLflow tracking store, through MlflowClient (no global active run: several kiln runs in one
    process do not meet)."""

    name, purges = "mlflow", False
    STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, run_dir: Path, uri: str, experiment: str, params: dict | None, previous: dict | None):
        require("mlflow", "mlflow", "train.trackers mlflow")
        import logging

        for name in ("mlflow", "alembic"):  # creating a sqlite store logs each of its migrations at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        if previous and previous.get("run_id"):  # the store the run was created in (the run folder's, if moved)
            uri = run_folder_store(run_dir) if previous.get("in_run_folder") else previous.get("tracking_uri") or uri
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or run_folder_store(run_dir)
        self.in_run_folder = self.uri == run_folder_store(run_dir)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = MlflowClient(self.uri)
            if previous and previous.get("run_id"):
                self.run_id = previous["run_id"]
                self.client.get_run(self.run_id)  # it is still there
                self.client.update_run(self.run_id, status="RUNNING")
                return
            run = self.client.create_run(self._experiment(experiment, run_dir), run_name=run_dir.name,
                                         tags={"kiln.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            if params:  # a parameter's value: at most 6000 characters (500 on older servers)
                self.client.log_batch(self.run_id, params=[Param(k, v[:500]) for k, v in flatten(params).items()])
        except ImportError as e:  # mlflow-skinny alone has no sqlite store (sqlalchemy, alembic)
            raise KilnError(f"MLflow tracking store {self.uri} needs {e.name or e}: "
                            "pip install 'kiln[mlflow]'") from None
        except Exception as e:  # a server not reached, a run id the store does not have, ...
            raise KilnError(f"MLflow tracking store {self.uri}: {_first_line(e)}") from None

    def _experiment(self, name: str, run_dir: Path) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifacts = (run_dir / "mlruns" / "artifacts").resolve().as_uri() if self.in_run_folder else None
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except Exception:  # another run sharing the store created it just now
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "in_run_folder": self.in_run_folder}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, self.STATUS.get(status, "FAILED"))


class WandbTracker:
    """A Weights & Biases run: offline by default (files under <run folder>/wandb; `wandb sync` uploads them, the
    offline folders of a resumed run into one W&B run)."""

    name, purges = "wandb", False

    def __init__(self, run_dir: Path, project: str, mode: str, params: dict | None, previous: dict | None):
        wandb = require("wandb", "wandb", "train.trackers wandb")
        run_dir = Path(run_dir)
        settings = {"silent": True, "console": "off"}  # kiln prints (and keeps log.txt) itself
        known = getattr(wandb.Settings, "model_fields", None)
        settings = {k: v for k, v in settings.items() if known is None or k in known}
        kw = dict(project=(previous or {}).get("project") or project, dir=str(run_dir), mode=mode,
                  name=run_dir.name, settings=wandb.Settings(**settings))
        try:
            if previous and previous.get("id"):
                self.run = wandb.init(id=previous["id"], resume="allow", **kw)
            else:
                self.run = wandb.init(config=params or {}, **kw)
        except Exception as e:
            raise KilnError(f"W&B ({mode}): {_first_line(e)}") from None
        self.project, self.mode = kw["project"], mode

    def state(self) -> dict:
        return {"id": self.run.id, "project": self.project, "mode": self.mode}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code={"finished": 0, "killed": 130}.get(status, 1))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------------ opening


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_state(run_dir: Path, state: dict) -> None:
    path = Path(run_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def open_trackers(run_dir: Path, cfg, resume_step: int | None = None) -> list:
    """The sinks train.trackers chooses, opened for this run (rank 0 only). resume_step: a resumed kiln run, whose
    tracked runs (trackers.json) are reopened; a tracker without one there starts a new tracked run."""
    run_dir = Path(run_dir)
    names = chosen(cfg)
    previous = read_state(run_dir) if resume_step is not None else {}
    params = None
    opened: list = []
    try:
        for name in names:
            if name == "tensorboard":
                tracker = TensorBoardTracker.open(run_dir, resume_step)
            else:
                if params is None:
                    params = run_params(run_dir, cfg)
                prev = previous.get(name) if isinstance(previous.get(name), dict) else None
                if name == "mlflow":
                    tracker = MLflowTracker(run_dir, cfg.mlflow_uri, cfg.mlflow_experiment, params, prev)
                else:
                    tracker = WandbTracker(run_dir, cfg.wandb_project, cfg.wandb_mode, params, prev)
            if tracker is not None:
                opened.append(tracker)
    except BaseException:
        for tracker in opened:
            tracker.close("failed")
        raise
    state = {t.name: t.state() for t in opened if t.state() is not None}
    if state or (run_dir / STATE_FILE).is_file():
        write_state(run_dir, {**previous, **state})
    return opened
