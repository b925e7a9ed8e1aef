"""The metrics sinks' config (kiln.report.trackers): metrics.csv always, TensorBoard, MLflow, W&B by choice.

Beside its code, importing nothing but kiln.config_loader (see kiln.train.config for why)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config_loader import _f


@dataclass
class TrackingConfig:
    trackers: str = _f("tensorboard", "where metrics go besides metrics.csv: a comma list of tensorboard | mlflow | "
                       "wandb, or none (rank 0 logs; --resume continues the same tracked run)",
                       choices=("tensorboard", "mlflow", "wandb", "none"), several=True)
    tensorboard: bool = _f(True, "write TensorBoard events (if tensorboard is installed) when train.trackers names "
                           "tensorboard; false turns them off (the key of older configs)")
    mlflow_uri: str = _f("", "MLflow tracking URI (sqlite:///..., http://...); empty = $MLFLOW_TRACKING_URI, else "
                         "sqlite:///<run folder>/mlruns/mlflow.db")
    mlflow_experiment: str = _f("kiln", "MLflow experiment the run is logged under")
    wandb_project: str = _f("kiln", "Weights & Biases project")
    wandb_mode: str = _f("offline", "W&B mode: offline (files in <run folder>/wandb, no account; upload later with "
                         "`wandb sync`) | online", choices=("offline", "online"))
