"""Batch-size ramp: the global batch grows from one micro-batch per rank to the target over N tokens.

Micro-batches keep their global numbering (step k starts where step k-1 ended), so every sample is seen once
in order and a resume at any step lands on the same micro-batch. The learning rate follows the scaling rule
(linear or sqrt in the batch size) while the batch is small.
"""

from __future__ import annotations

import math


class BatchRamp:
    def __init__(self, target_accum: int, tokens_per_micro: int, ramp_tokens: int, lr_power: float = 0.0):
        self.target, self.tokens_per_micro, self.ramp_tokens, self.lr_power = \
            target_accum, tokens_per_micro, ramp_tokens, lr_power
        self._accum: list[int] = []
        self._first: list[int] = []
        self._micro_total = 0

    def _extend(self, step: int) -> None:
        while len(self._accum) <= step:
            seen = self._micro_total * self.tokens_per_micro
            frac = min(1.0, seen / self.ramp_tokens) if self.ramp_tokens else 1.0
            accum = max(1, min(self.target, math.ceil(1 + (self.target - 1) * frac)))
            self._accum.append(accum)
            self._first.append(self._micro_total)
            self._micro_total += accum

    def accum(self, step: int) -> int:
        self._extend(step)
        return self._accum[step]

    def first_micro(self, step: int) -> int:
        self._extend(step)
        return self._first[step]

    def lr_factor(self, step: int) -> float:
        return (self.accum(step) / self.target) ** self.lr_power
