"""Defaults chosen for speed: optimizer auto, Muon's Newton-Schulz precision, length-bucketed fine-tuning batches.

The FLOP estimate behind `optimizer: auto` is checked against torch's own FLOP counter (an independent count of
every matmul the Newton-Schulz iterations and a forward + backward really run), and the choice against the two
shapes it was measured on (docs/benchmarks.md): the default recipe keeps Muon, GPT-2 124M at batch 4 x 256 gets
AdamW. Both are properties of the shapes, true on any CPU.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.config import default_recipe_model, default_recipe_train, load_config
from kiln.model.config import preset
from kiln.model.transformer import Transformer
from kiln.train.muon import Muon, orthogonalize
from kiln.train.objectives import CausalLM
from kiln.train.optim import _hidden_matrices, choose_optimizer
from kiln.train.trainer import Trainer


def _tiny():
    cfg = default_recipe_model()
    cfg.vocab_size = 65
    cfg.resolve()
    torch.manual_seed(0)
    return Transformer(cfg)


def test_auto_estimate_matches_torchs_flop_counter():
    model = _tiny()
    tokens = 12 * 64
    name, ratio = choose_optimizer(model, tokens)
    named = [(n, p) for n, p in model.named_parameters()]
    hidden, _, _ = _hidden_matrices(model, named)
    with FlopCounterMode(display=False) as ns_count:
        for p in hidden:
            u = p.detach() if p.shape[0] <= p.shape[1] else p.detach().T
            orthogonalize(u[None].float(), dtype=torch.float32)
    x = torch.randint(0, 65, (12, 64))
    with FlopCounterMode(display=False) as step_count:
        model(x).float().logsumexp(-1).sum().backward()
    counted = ns_count.get_total_flops() / step_count.get_total_flops()
    # 6 x params x tokens leaves out attention's T^2 products and counts the embedding lookups as matmuls: 15%
    assert abs(ratio - counted) / counted < 0.15, (ratio, counted)
    assert name == "muon" and 0.3 < ratio < 1.0


def test_auto_picks_adamw_for_gpt2_small_at_a_small_batch_and_muon_at_a_large_one():
    cfg = preset("gpt2", context_length=256)
    cfg.resolve()
    with torch.device("meta"):  # shapes only: no 124M parameters allocated
        model = Transformer(cfg)
    assert choose_optimizer(model, 4 * 256)[0] == "adamw"
    assert choose_optimizer(model, 16 * 1024)[0] == "muon"


def test_default_recipe_is_auto_and_the_trainer_logs_its_choice(tmp_path):
    assert default_recipe_train().optimizer == "auto"
    cfg = load_config(None, {"train": {"max_steps": 1, "tensorboard": False}})
    model = _tiny()
    lines: list[str] = []
    data = torch.randint(0, 65, (12, 65))
    t = Trainer(model, CausalLM(), cfg.train, tmp_path, lambda i: data, log=lines.append, precision="fp32")
    assert t.optimizer_name == "muon" and any(line.startswith("optimizer auto: muon") for line in lines)
    muon = next(o for o in t.optimizer.optimizers if isinstance(o, Muon))
    assert muon.ns_dtype == torch.float32  # fp32 run: no emulated bf16 matmuls in the optimizer
    t.train_step()


def test_fp32_newton_schulz_orthogonalizes_like_bf16():
    torch.manual_seed(0)
    g = torch.randn(3, 32, 96)
    a, b = orthogonalize(g, dtype=torch.float32), orthogonalize(g).float()
    assert a.dtype == torch.float32
    for o in (a, b):  # Muon's quintic iteration leaves singular values in a band around 1, not exactly 1
        s = torch.linalg.svdvals(o.float())
        assert s.min() > 0.5 and s.max() < 1.3
    assert (a - b).abs().max() < 0.05  # bf16 rounding is the only difference


def test_length_buckets_pad_less_keep_every_example_once_and_seek():
    """classify's length_buckets: fewer padded positions than a plain shuffle, each example once per epoch, and
    batch i a pure function of i (a fresh sampler, as after a resume, gives the same batch)."""
    import numpy as np

    from kiln.data.batches import EpochSampler

    lengths = np.random.default_rng(0).integers(3, 64, 1000)
    plain, bucketed = EpochSampler(lengths, 32, seed=1), EpochSampler(lengths, 32, seed=1, bucket=10)
    per_epoch = plain.per_epoch

    def padded(s):
        return sum(len(s.indices(i)) * lengths[s.indices(i)].max() for i in range(per_epoch))

    assert padded(bucketed) < 0.75 * padded(plain)
    seen = np.concatenate([bucketed.indices(i) for i in range(per_epoch)])
    assert sorted(seen.tolist()) == list(range(1000))
    fresh = EpochSampler(lengths, 32, seed=1, bucket=10)
    assert np.array_equal(fresh.indices(per_epoch + 7), bucketed.indices(per_epoch + 7))
    assert not np.array_equal(bucketed.indices(0), bucketed.indices(per_epoch))  # reshuffled each epoch
