"""Objectives: each is a loss over a batch (a SUM over targets) and a count of its targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.constants import IGNORE_INDEX
from kiln.run.checkpoint import unwrap


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
            if torch.is_autocast_enabled(x.device.type) and next(self.teacher.parameters()).dtype == torch.float32:
                self.teacher.to(torch.bfloat16)  # under bf16 autocast the teacher only runs forward: half the bytes
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


def model_inputs(batch: dict) -> dict:
    """The keyword inputs of a text model in a batch dict (labels and teacher outputs left out)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


class ClassificationObjective:
    """Cross-entropy over the batch's labels (a SUM; optionally class-weighted). With teachers' logits in the
    batch (`teacher_logits` [B, n_teachers, n_classes], fine-tuned classifiers run once before training):
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, per example, where teacher_T is the
    mean of the teachers' distributions at temperature T (an ensemble). A `hard` weight per example (augmented
    texts: 0) switches the cross-entropy term off where the label is not known to hold."""

    def __init__(self, weights: list[float] | None = None, alpha: float = 0.5, temperature: float = 2.0):
        self.weights = torch.tensor(weights, dtype=torch.float32) if weights else None
        self.alpha, self.temperature = alpha, temperature

    def targets(self, batch) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(**model_inputs(batch)).float()
        w = self.weights.to(logits.device) if self.weights is not None else None
        if "hard" in batch:
            hard = batch["hard"].to(logits.device)
            ce = (F.cross_entropy(logits, batch["labels"], weight=w, reduction="none") * hard).sum()
        else:
            ce = F.cross_entropy(logits, batch["labels"], weight=w, reduction="sum")
        if "teacher_logits" not in batch or self.alpha == 0.0:
            return ce
        T = self.temperature
        t = batch["teacher_logits"].to(logits.device).float()
        t_logp = torch.logsumexp(F.log_softmax(t / T, -1), dim=1) - math.log(t.shape[1])  # log of the mean
        kd = F.kl_div(F.log_softmax(logits / T, -1), t_logp, log_target=True, reduction="sum") * (T * T)
        return self.alpha * kd + (1.0 - self.alpha) * ce


class MultiLabelObjective:
    """Multi-label classification: binary cross-entropy with logits of every label (a sigmoid each), averaged over
    the labels and summed over the examples; `labels` is the multi-hot [B, n_labels] float target."""

    def targets(self, batch) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(**model_inputs(batch)).float()
        y = batch["labels"].to(logits.device, torch.float32)
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).sum()


class RegressionObjective:
    """Regression: squared error of the one output against the `labels` [B] numbers, summed (the mean is the MSE)."""

    def targets(self, batch) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, model, batch) -> torch.Tensor:
        pred = model(**model_inputs(batch)).float()[:, 0]
        return F.mse_loss(pred, batch["labels"].to(pred.device, torch.float32), reduction="sum")


class Seq2SeqLM:
    """Teacher forcing: cross-entropy of labels given decoder_input_ids and the source (a SUM over the
    non-padding target tokens, with optional label smoothing)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def targets(self, batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(batch["decoder_input_ids"], src=batch["input_ids"], src_mask=batch["attention_mask"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum", label_smoothing=self.label_smoothing)
