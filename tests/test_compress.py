import json

import pytest
import torch

from conftest import TINY, assert_user_error
from kiln.cli import main
from kiln.compress.quantize import Int8Embedding, Int8Linear, quantize_model
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer


def test_int8_model_stays_close_to_float_and_keeps_tied_embeddings():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=64, context_length=16)).eval()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref = model(x)
        quantize_model(model)
        got = model(x)
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight_int8.dtype == torch.int8
    assert isinstance(model.decoder.embed.tokens, Int8Embedding)
    assert model.decoder.embed.tokens.weight_int8 is model.lm_head.weight_int8  # still tied: one int8 matrix
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 0.03, rel  # changed (it is quantized), but only by int8 rounding
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_quantize_cli_writes_a_loadable_smaller_run_and_reports_the_trade_off(corpus, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "q"
    assert main(["pretrain", "--data.source", str(corpus), "--out", str(run), *TINY,
                 "--model.d_model", "64", "--train.max_steps", "30"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weights file" in printed and "val loss" in printed and "greedy decode" in printed
    report = json.loads((out / "compress.json").read_text())
    assert report["size_mb"]["after"] < report["size_mb"]["before"] / 2.5
    assert abs(report["val_loss"]["after"] - report["val_loss"]["before"]) < 0.05
    from kiln import load, sample

    model, tokenizer, _ = load(out)
    assert isinstance(model.lm_head, Int8Linear) and tokenizer is not None
    for precision in ("fp32", "bf16"):
        text = sample(out, "ROMEO:", max_new_tokens=20, greedy=True, precision=precision)
        assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    # bad input: an occupied output folder, quantizing twice
    assert_user_error(capsys, ["quantize", run, "--out", out], "already holds checkpoints")
    assert_user_error(capsys, ["quantize", out, "--out", tmp_path / "qq"], "already quantized")
