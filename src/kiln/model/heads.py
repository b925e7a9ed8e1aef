"""Optional heads some imported families carry (BERT): switched on by ModelConfig.mlm_head / .pooler."""

from __future__ import annotations

import torch
import torch.nn as nn

from kiln.model.config import ModelConfig
from kiln.model.layers import make_norm


class MLMTransform(nn.Module):
    """BERT's `cls.predictions.transform`: dense -> activation -> norm, applied before the (biased) LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}.get(
            cfg.activation, nn.SiLU())
        self.norm = make_norm(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(h)))


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(h[:, 0])), the sentence vector of classification heads. Not used by forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))
