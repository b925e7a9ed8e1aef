"""Cross-entropy fused with the output projection (the LM head), for training.

The plain path materialises logits [N, vocab], then log-softmax reads and writes them again in the forward and
twice more in the backward. For GPT-2 (vocab 50,257) at 1,024 tokens that is ~100 MB of bf16 per pass, and on
a CPU those memory passes cost as much as the head's matmul itself. Here the forward computes the logits once,
turns them *in place* into the gradient of the summed loss (softmax - one-hot) a row chunk at a time while the
chunk is still in cache, and the backward is two matmuls on that buffer. The softmax is computed in fp32
whatever the matmul dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.constants import IGNORE_INDEX


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index: int, chunk: int, need_grad: bool):
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        hc, wc = h.to(dtype), weight.to(dtype)
        bc = None if bias is None else bias.to(dtype)
        with torch.autocast(h.device.type, enabled=False):
            logits = hc @ wc.t() if bc is None else torch.addmm(bc, hc, wc.t())  # [N, V]: becomes the gradient
            sums = []  # the returned total is made once at the end, never updated in place (pytorch#180642)
            valid_all = targets != ignore_index
            for s in range(0, logits.shape[0], chunk):
                block, tgt, valid = logits[s:s + chunk], targets[s:s + chunk], valid_all[s:s + chunk]
                tsafe = tgt.clamp_min(0)
                f = block.to(torch.promote_types(block.dtype, torch.float32))  # fp32 at least
                lse = torch.logsumexp(f, dim=-1)
                picked = f.gather(1, tsafe[:, None]).squeeze(1)
                sums.append(torch.where(valid, lse - picked, 0.0).sum())
                if need_grad:
                    f.sub_(lse[:, None]).exp_()
                    f.scatter_add_(1, tsafe[:, None], torch.full_like(picked[:, None], -1.0))
                    f.mul_(valid[:, None])
                    block.copy_(f)
            total = torch.stack(sums).sum() if sums else logits.new_zeros((), dtype=torch.float32)
        if need_grad:
            ctx.save_for_backward(hc, wc, logits)
            ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # every gradient is computed: ctx.needs_input_grad is not reliable under torch.compile (seen on torch
        # 2.11 + CUDA: all False, so no gradient reached the model and compiled training did not learn)
        hc, wc, dlogits = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.to(dlogits.dtype)
        with torch.autocast(hc.device.type, enabled=False):
            dlogits.mul_(scale)
            gh = (dlogits @ wc).to(h_dtype)
            gw = (dlogits.t() @ hc).to(w_dtype)
            gb = None if b_dtype is None else dlogits.sum(0, dtype=torch.promote_types(dlogits.dtype, torch.float32)).to(b_dtype)
        return gh, gw, gb, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                         chunk: int = 0) -> torch.Tensor:
    """sum over rows of cross_entropy(h @ weight.T + bias, targets), ignoring `ignore_index`; fp32 scalar.

    h [N, D], weight [V, D], targets [N]. Equal (up to rounding) to
    F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum", ignore_index=ignore_index).
    """
    if chunk <= 0:  # rows per softmax chunk: on a CPU ~4M logits (16 MB in fp32, cache-sized); on a GPU ~256M
        # (1 GB), few enough chunks that kernel launches stay cheap. One chunk for small vocabularies.
        chunk = max(1, (1 << (22 if h.device.type == 'cpu' else 28)) // weight.shape[0])
    if torch.compiler.is_compiling():
        # under torch.compile the plain formulation, which the compiler fuses itself. Traced through this
        # autograd.Function, torch 2.11 + CUDA gave exactly zero gradients and compiled training did not learn
        # (an H200, docs/benchmarks.md): in-place ops in an autograd.Function's forward mis-route gradients
        # under compile in torch 2.11 (pytorch/pytorch#180642)
        logits = F.linear(h, weight, bias)
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index,
                               reduction="sum")
    # decided here, outside the autograd.Function (see backward)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))
    return _LinearCrossEntropy.apply(h, weight, bias, targets, ignore_index, chunk, need_grad)
