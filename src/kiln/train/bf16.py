"""bf16 weights (train.bf16_weights): forward and backward run in a bf16 copy of the model; the fp32 model is the
master copy the optimizer updates and checkpoints store (exact resume, no precision lost in the weights)."""

from __future__ import annotations

import torch


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    twin = copy.deepcopy(model)
    for p in twin.parameters():  # parameters only: buffers such as RoPE tables stay fp32
        if p.is_floating_point():  # int8 weights (a LoRA run's int8 base) stay int8
            p.data = p.data.to(torch.bfloat16)
    for mt, mm in zip(twin.modules(), model.modules(), strict=True):  # the buffers are the master's own tensors:
        for name, b in mm._buffers.items():  # what the forward updates (BatchNorm's running statistics) is what
            if b is not None:  # the checkpoint stores
                mt._buffers[name] = b
    return twin


@torch.no_grad()
def grads_to_master(compute: torch.nn.Module, master: torch.nn.Module) -> None:
    for pc, pm in zip(compute.parameters(), master.parameters(), strict=True):
        pm.grad = None if pc.grad is None else pc.grad.float()
        pc.grad = None


@torch.no_grad()
def master_to_copy(master: torch.nn.Module, compute: torch.nn.Module, trainable_only: bool = False) -> None:
    """trainable_only: after an optimizer step, only what it moved (a LoRA run's frozen base never changes)."""
    pairs = [(c, m) for c, m in zip(compute.parameters(), master.parameters(), strict=True)
             if m.requires_grad or not trainable_only]
    if pairs:
        torch._foreach_copy_([c for c, _ in pairs], [m for _, m in pairs])
