"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes").

Per parameter w with gradient g, at step t:
    m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
    w = w - lr * r * u,            r = ||w|| / ||u||   (r = 1 when either norm is 0)

The trust ratio r makes each layer's step proportional to its weight norm, which is what lets the batch
(and the learning rate) grow. Only tensor ops, no .item(): it runs on sharded (FSDP2 DTensor) parameters
too, whose norms are reduced over the shards by DTensor.
"""

from __future__ import annotations

import torch


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                acc = torch.promote_types(p.dtype, torch.float32)  # moments and norms in at least fp32
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=acc, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=acc, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])  # a CPU scalar: no device sync
                m, v = state["exp_avg"], state["exp_avg_sq"]
                g, w = p.grad.to(acc), p.detach().to(acc)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(eps))
                if wd != 0:
                    update.add_(w, alpha=wd)
                w_norm = torch.linalg.vector_norm(w)
                u_norm = torch.linalg.vector_norm(update)
                ones = torch.ones_like(w_norm)
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm.clamp_min(1e-38), ones)
                p.sub_((update * (trust * lr)).to(p.dtype))
        return loss
