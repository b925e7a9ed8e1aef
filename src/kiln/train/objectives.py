"""Objectives: each is a loss over a batch (a SUM over targets) and a count of its targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.train.checkpoint import unwrap


class CausalLM:
    """Next-token prediction on [B, T+1] windows: inputs batch[:, :-1], targets batch[:, 1:]."""

    def targets(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        if getattr(unwrap(model), "fused_loss", False):  # kiln's Transformer: head and loss fused, fp32 softmax
            return model(batch[:, :-1], labels=batch[:, 1:])
        logits = model(batch[:, :-1])
        # per-token losses in the logits' dtype (the kernel accumulates in fp32), summed in fp32. Upcasting
        # bf16 logits first costs 13% of a GPT-2-small step on CPU; on the default recipe the val loss after
        # 550 steps moved from 1.866 to 1.877 (docs/benchmarks.md)
        per_token = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        return per_token.float().sum()


class DistillLM(CausalLM):
    """Knowledge distillation (Hinton et al. 2015) of a causal LM: per target token,
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, summed. The teacher is frozen."""

    def __init__(self, teacher: torch.nn.Module, alpha: float = 0.5, temperature: float = 2.0):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x).float().flatten(0, 1)
        ce = F.cross_entropy(logits, y.flatten(), reduction="sum")
        if self.alpha == 0.0:  # the same student without its teacher (the baseline of a distillation study)
            return ce
        with torch.no_grad():
            t_logits = self.teacher(x).float().flatten(0, 1)
        T = self.temperature
        kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                      reduction="sum") * (T * T)
        return self.alpha * kd + (1.0 - self.alpha) * ce


def evaluate_lm(model, objective, batches) -> dict:
    """Mean loss and perplexity over fixed validation batches, reduced on the fly (no logits kept)."""
    total, count = 0.0, 0
    for batch in batches():
        total += float(objective.loss(model, batch))
        count += objective.targets(batch)
    val = total / max(count, 1)
    return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
