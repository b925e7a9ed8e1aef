"""ELECTRA pretraining (replaced-token detection): it learns, resumes exactly, and its run folder is an encoder."""

import csv

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_until_crash
from kiln.config import load_config
from kiln.errors import KilnError
from kiln.tasks.lm import run_pretrain

ENCODER = ["--objective", "electra", "--model.arch", "encoder", "--model.position", "rope",
           "--electra.generator_fraction", "0.5"]


def cfg_for(corpus, out, *extra):
    return load_config(None, ["--data.source", str(corpus), "--out", str(out), *TINY, *ENCODER, *extra])


def rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_the_discriminator_learns_to_find_replaced_tokens():
    """Counting sequences (each token = the previous + a fixed step): a replacement breaks the pattern, so it can
    be found from the neighbours. Saying "original" everywhere scores 1 - replaced_share; the discriminator must
    beat that by finding the replaced tokens, while the generator learns to fill the masks."""
    from kiln.model.config import ModelConfig
    from kiln.model.transformer import Transformer
    from kiln.train.electra import Electra, ReplacedTokenDetection, generator_config
    from kiln.train.mlm import MaskedLM

    torch.manual_seed(0)
    V, T = 40, 32

    def windows(n, g):
        start, step = torch.randint(0, V - 1, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
        return (start + step * torch.arange(T + 1)) % (V - 1)

    mlm = MaskedLM(V, V - 1, mask_prob=0.15, seed=0)
    cfg = ModelConfig(arch="encoder", vocab_size=V, n_layer=2, n_head=2, d_model=32, context_length=T,
                      position="rope").resolve()
    model = Electra(Transformer(cfg), generator_config(cfg, 0.5))
    rtd = ReplacedTokenDetection(mlm)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for i in range(300):  # measured at 300 / 600 steps: gen_mlm_accuracy 0.74 / 0.85, rtd_accuracy 0.966 / 0.986
        b = mlm.mask(windows(32, g), i)  # vs 1 - replaced_share 0.919 / 0.954, replaced_recall 0.60 / 0.77
        loss = rtd.loss(model, b) / rtd.targets(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    val = [windows(64, torch.Generator().manual_seed(99 + i)) for i in range(4)]
    m = rtd.evaluate(model.eval(), lambda: iter(val))
    assert m["gen_mlm_accuracy"] > 0.5
    assert 0.01 < m["replaced_share"] < 0.15  # the generator is often right: those tokens count as original
    assert m["rtd_accuracy"] > 1 - m["replaced_share"] and m["replaced_recall"] > 0.4, m


def test_electra_run_reports_its_metrics_and_resumes_bit_for_bit(corpus, tmp_path):
    full = run_pretrain(cfg_for(corpus, tmp_path / "full", "--train.max_steps", "16"), quiet=True)
    part = cfg_for(corpus, tmp_path / "part", "--train.max_steps", "16", "--train.save_every", "5")
    run_until_crash(lambda: run_pretrain(part, quiet=True), 10)
    run_pretrain(load_config(tmp_path / "part/config.yaml"), resume=tmp_path / "part", quiet=True)
    a = {r["step"]: r["loss"] for r in rows(full) if r.get("loss")}
    b = {r["step"]: r["loss"] for r in rows(tmp_path / "part") if r.get("loss")}
    assert len(a) == 16 and a == b  # the generator's samples come from the saved RNG state too
    evals = [r for r in rows(full) if r.get("rtd_accuracy")]
    assert len(evals) == 2 and all(float(evals[-1][k]) > 0 for k in ("gen_mlm_accuracy", "replaced_share"))


def test_an_electra_run_loads_as_its_discriminator(corpus, tmp_path):
    import kiln

    run = run_pretrain(cfg_for(corpus, tmp_path / "run", "--train.max_steps", "4"), quiet=True)
    latest = (run / "checkpoints/latest").read_text().strip()
    saved = load_file(str(run / "checkpoints" / latest / "model.safetensors"))
    assert any(k.startswith("generator.") for k in saved) and any(k.startswith("rtd_") for k in saved)
    model, tokenizer, cfg = kiln.load(run)
    assert cfg.model.arch == "encoder" and tokenizer is not None
    state = model.state_dict()
    for name, tensor in saved.items():
        if name.startswith("discriminator."):
            assert torch.equal(state[name[len("discriminator."):]], tensor), name
    # and a new run can start from it (the encoder only; the generator starts afresh)
    again = run_pretrain(cfg_for(corpus, tmp_path / "again", "--train.max_steps", "2", "--init", str(run)), quiet=True)
    assert "init: weights from" in (again / "log.txt").read_text()


def test_electra_bad_settings_are_one_line_errors(corpus, tmp_path):
    with pytest.raises(KilnError, match="electra.generator_fraction must be in"):
        run_pretrain(cfg_for(corpus, tmp_path / "a", "--electra.generator_fraction", "0"), quiet=True)
    with pytest.raises(KilnError, match="objective electra trains an encoder"):
        run_pretrain(cfg_for(corpus, tmp_path / "b", "--model.arch", "decoder"), quiet=True)


def test_replacements_are_sampled_from_the_generator_distribution():
    from kiln.train.electra import sample_rows

    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    draws = sample_rows(probs.log().expand(40_000, 5).contiguous())
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.01) and freq[4] == 0  # a zero-probability token is never drawn
