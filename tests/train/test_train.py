import csv
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, TINY, run_until_crash
from kiln.config import load_config
from kiln.errors import KilnError
from kiln.model.transformer import Transformer
from kiln.data.batches import ArrayTokens, TokenBatches
from kiln.train.objectives import CausalLM
from kiln.tasks.lm import run_pretrain
from kiln.train.trainer import Trainer


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


def cfg_for(corpus, out, *extra):
    return load_config(None, ["--data.source", str(corpus), "--out", str(out), *TINY, *extra])


def test_tiny_gpt_learns_and_writes_a_complete_run_folder(corpus, tmp_path):
    from kiln.config import to_dict

    started = to_dict(cfg_for(corpus, tmp_path / "run", "--train.max_steps", "30"))
    run = run_pretrain(cfg_for(corpus, tmp_path / "run", "--train.max_steps", "30"), quiet=True)
    curve = losses(run)
    assert curve[1] > 3.5 and curve[30] < curve[1] - 0.5  # from ~ln(vocab) down, for real
    for name in ("config.yaml", "metrics.csv", "tokenizer.json", "log.txt", "plots/loss.png",
                 "checkpoints/latest", "checkpoints/best"):
        assert (run / name).is_file(), name
    latest = (run / "checkpoints/latest").read_text().strip()
    assert latest == "step_000030" and (run / "checkpoints" / latest / "model.safetensors").is_file()
    # config.yaml is the config the run was started with, field by field, except the values left at 0 ("auto"),
    # which it holds resolved: the tokenizer's vocabulary and the shapes derived from the model's
    def flat(d, prefix=""):
        return {k: v for key, value in d.items()
                for k, v in (flat(value, f"{prefix}{key}.").items() if isinstance(value, dict) else [(prefix + key, value)])}

    saved, given = flat(to_dict(load_config(run / "config.yaml"))), flat(started)
    changed = {k: (given[k], saved[k]) for k in given if saved[k] != given[k]}
    vocab = len(set(corpus.read_text()))
    assert changed == {"model.vocab_size": (0, vocab), "model.d_ff": (0, 128), "model.n_kv_head": (0, 2),
                       "model.n_decoder_layer": (0, 2)}, changed
    assert saved.keys() == given.keys()
    # and the run is reproducible from it: the same first losses, bit for bit
    again = load_config(run / "config.yaml", ["--out", str(tmp_path / "again")])
    run_until_crash(lambda: run_pretrain(again, quiet=True), 3)
    assert [losses(tmp_path / "again")[s] for s in (1, 2, 3)] == [curve[s] for s in (1, 2, 3)]


def test_the_loss_plot_is_redrawn_at_most_every_10_s_and_the_end_shows_the_last_evaluation(tmp_path, monkeypatch):
    import kiln.report.plots as trainer_module

    now, drawn = [0.0], []
    monkeypatch.setattr(trainer_module, "loss_curve", lambda metrics, path, **kw: drawn.append(now[0]))
    plot = trainer_module.LossPlot(None, tmp_path / "loss.png", "run", "token", clock=lambda: now[0])
    for now[0] in (0.0, 4.0, 8.0, 12.0, 13.0):  # five evaluations
        plot.evaluated()
    assert drawn == [0.0, 12.0]  # the first; 4 and 8 s are within 10 s of it; 12 s is not; 13 s is within 10 of 12
    now[0] = 14.0
    plot.flush()  # the run ends: the evaluation at 13 s is not drawn yet
    plot.flush()  # nothing new since
    assert drawn == [0.0, 12.0, 14.0]


def test_a_run_draws_its_loss_plot_at_the_first_evaluation_and_shows_the_last(corpus, tmp_path, monkeypatch):
    import kiln.report.plots as trainer_module

    real, shown = trainer_module.loss_curve, []  # the last evaluation step each drawing shows

    def spy(metrics, path, **kw):
        shown.append(max(metrics.series("val_loss")[0]))
        return real(metrics, path, **kw)

    monkeypatch.setattr(trainer_module, "loss_curve", spy)
    run = run_pretrain(cfg_for(corpus, tmp_path / "run", "--train.max_steps", "30"), quiet=True)  # evals 10, 20, 30
    assert shown[0] == 10 and shown[-1] == 30 and len(shown) <= 3, shown  # [10, 30] unless 10 s pass between
    assert (run / "plots" / "loss.png").stat().st_size > 0


def test_resume_continues_bit_for_bit(corpus, tmp_path):
    full = run_pretrain(cfg_for(corpus, tmp_path / "full", "--train.max_steps", "24"), quiet=True)
    part = cfg_for(corpus, tmp_path / "part", "--train.max_steps", "24", "--train.save_every", "5")
    part.train.max_steps = 24
    # stop after step 15 as if the process died there (the last checkpoint is step 15)
    run_until_crash(lambda: run_pretrain(part, quiet=True), 15)
    assert (tmp_path / "part/checkpoints/latest").read_text().strip() == "step_000015"
    cfg = load_config(tmp_path / "part/config.yaml")
    run_pretrain(cfg, resume=tmp_path / "part", quiet=True)
    a, b = losses(full), losses(tmp_path / "part")
    assert sorted(b) == sorted(a) == list(range(1, 25))
    assert all(a[s] == b[s] for s in range(1, 25)), [(s, a[s], b[s]) for s in a if a[s] != b[s]]


def test_gradient_is_independent_of_accumulation_split():
    torch.manual_seed(0)
    tokens = ArrayTokens(torch.randint(0, 40, (5000,)).numpy())
    grads = []
    for batch, accum in ((8, 1), (1, 8), (2, 4)):
        torch.manual_seed(0)
        cfg = load_config(None, ["--train.batch_size", str(batch), "--train.grad_accum", str(accum),
                                 "--train.grad_clip", "0", "--train.tensorboard", "false"])
        model = Transformer(cfg.model.with_(vocab_size=40, n_layer=1, d_model=32, n_head=2, context_length=16))
        trainer = Trainer(model, CausalLM(), cfg.train, Path("/nonexistent"),
                          TokenBatches(tokens, 16, batch, seed=3).batch)
        trainer.optimizer.step = lambda: None  # look at the gradient only
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        trainer.train_step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path / "run", "--train.max_steps", "20", "--train.save_every", "4")
    original = CausalLM.loss
    calls = {"n": 0}

    def poisoned(self, model, batch):
        calls["n"] += 1
        loss = original(self, model, batch)
        return loss * float("nan") if calls["n"] > 10 else loss

    CausalLM.loss = poisoned
    try:
        with pytest.raises(KilnError, match=r"loss became nan at step 11.*last good checkpoint is step_000010"):
            run_pretrain(cfg, quiet=True)
    finally:
        CausalLM.loss = original
    from kiln.api import load

    model, tok, _ = load(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# The golden curve: AdamW and fp32 throughout, so another CPU changes only the order of fp32 sums (BLAS blocking,
# SIMD width), not the arithmetic; Muon's bf16 Newton-Schulz would make the curve a property of the CPU's bf16
# matmul (its spread under the stand-ins below: 1e-5 by step 8, 20x AdamW's). GOLDEN_ATOL is 8 ulp of a loss in
# [2, 4): a reordering moves the weights by ~1e-7 relative and the loss by an ulp or two. Measured on AMD EPYC
# (AVX2), torch 2.13.0+cpu: batch 2 x 2 or 1 x 4 micro-batches instead of 4 x 1, ATen's scalar kernels
# (ATEN_CPU_CAPABILITY=default), oneDNN held to SSE4.1 or MKL to SSE4.2 stay within 5e-7 of the golden curve over
# the 8 steps. What it catches (max |delta| over the 8 steps): weight_decay 0.1 -> 0.11: 6.8e-5, beta2 0.99 ->
# 0.991: 8.1e-5, init_std 0.02 -> 0.0201: 4.6e-4, norm_eps 1e-5 -> 1e-6: 2.2e-4, no grad clipping: 4.9e-3.
GOLDEN_ATOL = 2e-6


def test_golden_loss_curve(corpus, tmp_path):
    """A fixed-seed tiny run; a silent numerical change in model, data order or optimizer shows up here."""
    args = ["--train.max_steps", "8", "--train.eval_every", "100", "--train.optimizer", "adamw"]
    golden = [float(x) for x in (ASSETS / "golden_losses.txt").read_text().split()]
    run = run_pretrain(cfg_for(corpus, tmp_path / "run", *args), quiet=True)
    got = [losses(run)[s] for s in range(1, 9)]
    assert max(abs(a - b) for a, b in zip(got, golden)) <= GOLDEN_ATOL, got
    # the same steps with each batch as 2 micro-batches of 2: the same arithmetic in another fp32 order meets the
    # same bound, on whatever CPU runs this (so GOLDEN_ATOL is above that noise; at a tenth of it, here, it is not)
    split = run_pretrain(cfg_for(corpus, tmp_path / "split", *args, "--train.batch_size", "2", "--train.grad_accum",
                                 "2"), quiet=True)
    again = [losses(split)[s] for s in range(1, 9)]
    assert max(abs(a - b) for a, b in zip(again, golden)) <= GOLDEN_ATOL, again


def test_layer_lr_decay_scales_lr_by_depth_and_rejects_bad_values():
    from kiln.config import TrainConfig
    from kiln.model.config import ModelConfig
    from kiln.train.optim import build_optimizer, set_lr

    model = Transformer(ModelConfig(vocab_size=40, n_layer=3, n_head=2, d_model=16, context_length=8,
                                    tie_embeddings=False))
    opt = build_optimizer(model, TrainConfig(layer_lr_decay=0.5, weight_decay=0.1))
    set_lr(opt, 1.0)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    blocks = model.decoder.blocks
    assert lr_of[id(model.lm_head.weight)] == (1.0, 0.1)            # head: full lr
    assert lr_of[id(next(p for p in blocks[2].parameters() if p.dim() == 2))][0] == 0.5  # last block
    assert lr_of[id(next(p for p in blocks[0].parameters() if p.dim() == 2))][0] == 0.125
    assert lr_of[id(model.decoder.embed.tokens.weight)] == (0.0625, 0.1)  # embeddings: below block 0
    assert lr_of[id(next(p for p in blocks[0].parameters() if p.dim() == 1))][1] == 0.0  # no decay on 1-D
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    from kiln.config import RunConfig, load_config
    with pytest.raises(KilnError, match=r"layer_lr_decay must be in \(0, 1\], got 1.5"):  # its range, at load
        load_config(None, ["--train.layer_lr_decay", "1.5"], cls=RunConfig)


def test_lr_0_with_muon_is_a_frozen_run_and_lr_above_0_keeps_muons_schedule(corpus, tmp_path):
    """--train.lr 0 is a frozen run with every optimizer: with Muon it once divided by it (muon_lr / lr) and
    ended in a ZeroDivisionError; and min_lr > 0 no longer lifts a peak of 0 midway through the decay."""
    from kiln.config import TrainConfig
    from kiln.model.config import ModelConfig
    from kiln.train.optim import build_optimizer, lr_at, set_lr

    model = Transformer(ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=16, context_length=8,
                                    tie_embeddings=False))
    cfg = TrainConfig(optimizer="muon", lr=0.0, min_lr=1e-3, weight_decay=0.1, warmup_steps=2, max_steps=6)
    opt = build_optimizer(model, cfg)
    assert len(opt.optimizers) == 2  # Muon for the hidden matrices, AdamW for the rest
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    for step in range(cfg.max_steps):
        assert lr_at(step, cfg) == 0.0
        set_lr(opt, lr_at(step, cfg))
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert not changed, changed  # neither AdamW's part (embeddings, head, norms) nor Muon's moved
    # lr > 0: Muon's lr is the schedule's times muon_lr / lr, as before (the same float, bit for bit)
    cfg = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02, min_lr=1e-4, warmup_steps=2, max_steps=6)
    opt = build_optimizer(model, cfg)
    for step in range(cfg.max_steps):
        set_lr(opt, lr_at(step, cfg))
        assert opt.optimizers[0].param_groups[0]["lr"] == lr_at(step, cfg) * (cfg.muon_lr / cfg.lr)
        assert all(g["lr"] == lr_at(step, cfg) for g in opt.optimizers[1].param_groups)
    # and through the CLI: the run finishes; its evaluations at steps 2 and 4 see the same weights
    from kiln.cli import main

    run = tmp_path / "frozen"
    assert main(["pretrain", "--data.source", str(corpus), "--out", str(run), *TINY, "--train.max_steps", "4",
                 "--train.eval_every", "2", "--train.optimizer", "muon", "--train.lr", "0"]) == 0
    with open(run / "metrics.csv") as f:
        val = [float(r["val_loss"]) for r in csv.DictReader(f) if r.get("val_loss")]
    assert len(val) == 2 and val[0] == val[1], val


def test_a_zero_gradient_at_the_first_step_is_an_error_not_a_silent_run(corpus, tmp_path):
    """A model that cannot learn (every gradient exactly zero, as compiled training once gave on a GPU) stops."""
    cfg = cfg_for(corpus, tmp_path / "run", "--train.max_steps", "5")
    original = CausalLM.loss
    CausalLM.loss = lambda self, model, batch: original(self, model, batch) * 0.0
    try:
        with pytest.raises(KilnError, match="gradient is exactly zero at step 1"):
            run_pretrain(cfg, quiet=True)
    finally:
        CausalLM.loss = original


def test_compiled_fused_loss_gives_the_eager_gradients(one_thread):
    """torch.compile of the model with its fused head + loss: same loss and gradients as eager."""
    cfg = load_config(None, []).model.with_(vocab_size=97, n_layer=1, d_model=32, n_head=2, context_length=16)
    x = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg)
        run = torch.compile(model) if compiled else model
        loss = run(x[:, :-1], labels=x[:, 1:])
        loss.backward()
        results.append((float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) < 1e-3 * abs(l0)
    assert float(g1.norm()) > 0.0 and torch.allclose(g0, g1, atol=1e-5, rtol=1e-4)


def test_decoding_during_training_sees_the_weights_of_that_step(tmp_path):
    """Greedy decoding packs the linear weights once for oneDNN and caches them (kiln.model.packed); the fused
    AdamW step updates weights without bumping their version, so an evaluation that decodes (seq2seq BLEU, LM
    samples) must not reuse the first evaluation's packed weights. Each evaluation's greedy text equals that of a
    fresh copy of the model at that step (a copy has no packed weights)."""
    import copy

    from kiln.config import TrainConfig
    from kiln.model.config import ModelConfig
    from kiln.model.generate import generate
    from kiln.model.packed import available
    from kiln.model.transformer import Transformer
    from kiln.train.objectives import CausalLM
    from kiln.train.trainer import Trainer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=48, n_layer=1, n_head=2, d_model=32, context_length=16))
    data = torch.randint(0, 48, (64, 17))
    prompt = data[:1, :4]
    seen = []

    def evaluate(m):
        with torch.no_grad():
            got = generate(m, prompt, 8, greedy=True)
            fresh = generate(copy.deepcopy(m), prompt, 8, greedy=True)
        seen.append((got.tolist(), fresh.tolist()))
        return {"val_loss": 0.0}

    tc = TrainConfig(max_steps=6, batch_size=4, lr=3e-2, min_lr=3e-2, warmup_steps=0, eval_every=2, log_every=2,
                     optimizer="adamw", precision="fp32", tensorboard=False)
    Trainer(model, CausalLM(), tc, tmp_path / "run", lambda i: data[(4 * i) % 64:(4 * i) % 64 + 4],
            evaluate=evaluate, log=lambda *a: None).fit()
    assert len(seen) == 3 and all(got == fresh for got, fresh in seen), seen
    assert len({str(got) for got, _ in seen}) > 1 or not available("cpu")  # the weights did move the text
