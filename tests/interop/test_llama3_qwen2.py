"""Llama 3 RoPE scaling (`llama3`, `linear`) and Qwen2 (q/k/v biases, tied embeddings) through `kiln import hf`
and `kiln export hf`: small random transformers models, kiln's logits within 1e-4 of theirs both ways; a
linear-scaled Llama through GGUF as well."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from kiln.cli import main  # noqa: E402
from kiln.run.load import load  # noqa: E402

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)  # logits of order 1
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def build(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True, **kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, **kw))
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def round_trip(tmp_path, model) -> tuple[float, float, dict]:
    """(max |kiln - transformers|, max |transformers(exported) - transformers|, exported config.json)."""
    src, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "exported"
    model.save_pretrained(src)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 300), generator=torch.Generator().manual_seed(1))
    want = hf_logits(model, ids)
    assert main(["import", "hf", str(src), str(run)]) == 0
    kiln_model = load(run)[0]
    with torch.no_grad():
        imported = (kiln_model(ids) - want).abs().max().item()
    assert main(["export", "hf", str(run), str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    exported = (hf_logits(back, ids) - want).abs().max().item()
    return imported, exported, json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("scaling", [LLAMA3, {"rope_type": "linear", "factor": 4.0}])
def test_llama3_rope_scaling_round_trips(tmp_path, scaling):
    model = build("llama", rope_parameters={"rope_theta": 500000.0, **scaling})
    imported, exported, config = round_trip(tmp_path, model)
    assert imported < 1e-4 and exported < 1e-4, (imported, exported)
    assert config["rope_parameters"]["rope_type"] == scaling["rope_type"]
    cfg = load(tmp_path / "run")[2].model
    assert (cfg.rope_scaling, cfg.rope_scaling_factor) == (scaling["rope_type"], scaling["factor"])
    # the scaling matters at these positions: the same weights with plain RoPE are far off
    plain = load(tmp_path / "run")[0]
    from kiln.model.transformer import rope_tables

    plain.decoder.rope_cos, plain.decoder.rope_sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (plain(ids) - hf_logits(model, ids)).abs().max().item() > 1e-2


def test_qwen2_biases_and_tied_embeddings_round_trip(tmp_path):
    imported, exported, config = round_trip(tmp_path, build("qwen2"))
    assert imported < 1e-4 and exported < 1e-4, (imported, exported)
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    cfg = load(tmp_path / "run")[2].model
    assert cfg.qkv_bias and not cfg.bias and cfg.tie_embeddings


def test_linear_rope_scaling_through_gguf(tmp_path):
    pytest.importorskip("gguf")
    from kiln.interop.gguf_read import import_gguf
    from kiln.interop.run_files import write_imported_run
    from kiln.interop import llama
    from kiln.data.tokenizer import train_tokenizer

    model = build("llama", rope_parameters={"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0})
    cfg = llama.config_from_hf(model.config.to_dict())
    tok = train_tokenizer("bpe", ["hello world, the sea and the sky " * 50], vocab_size=SMALL["vocab_size"])
    run = write_imported_run(tmp_path / "run", cfg, llama.state_from_hf(model.state_dict(), cfg), name="linear",
                             source=tmp_path, tokenizer_json=tok.to_str(), tokenizer_config=None, chat_template=None,
                             model_type="test")
    assert main(["export", "gguf", str(run), str(tmp_path / "linear.gguf")]) == 0
    back = import_gguf(tmp_path / "linear.gguf", tmp_path / "back")
    assert load(back)[2].model.rope_scaling == "linear"
    ids = torch.randint(0, SMALL["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (load(back)[0](ids) - hf_logits(model, ids)).abs().max().item() < 1e-4


def test_llama3_rope_scaling_through_gguf_as_rope_freqs(tmp_path):
    """llama.cpp keeps Llama 3's scaling as a rope_freqs tensor (transformers' GGUF loader ignores it, so the
    reference is the Hugging Face model itself): export writes the tensor llama.cpp's converter computes, import
    reads the scaling back from it."""
    pytest.importorskip("gguf")
    import math

    from kiln.data.tokenizer import train_tokenizer
    from kiln.interop.gguf_read import import_gguf, open_gguf

    model = build("llama", rope_parameters={"rope_theta": 500000.0, **LLAMA3})
    src = tmp_path / "hf"
    model.save_pretrained(src)
    tok = train_tokenizer("bpe", ["hello world, the sea and the sky " * 50], vocab_size=SMALL["vocab_size"])
    tok.save(str(src / "tokenizer.json"))
    assert main(["import", "hf", str(src), str(tmp_path / "run")]) == 0
    assert main(["export", "gguf", str(tmp_path / "run"), str(tmp_path / "llama3.gguf")]) == 0
    stored = next(t for t in open_gguf(tmp_path / "llama3.gguf").tensors if t.name == "rope_freqs.weight")
    dim, base, factor = 16, 500000.0, LLAMA3["factor"]  # llama.cpp's convert_hf_to_gguf.py, written out again
    low_wavelen = LLAMA3["original_max_position_embeddings"] / LLAMA3["low_freq_factor"]
    high_wavelen = LLAMA3["original_max_position_embeddings"] / LLAMA3["high_freq_factor"]
    want = []
    for freq in 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            want.append(1.0)
        elif wavelen > low_wavelen:
            want.append(factor)
        else:
            smooth = (LLAMA3["original_max_position_embeddings"] / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / factor + smooth))
    assert torch.allclose(torch.from_numpy(stored.data.copy()), torch.tensor(want, dtype=torch.float32), rtol=1e-5)
    back = import_gguf(tmp_path / "llama3.gguf", tmp_path / "back")
    cfg = load(back)[2].model
    assert (cfg.rope_scaling, cfg.rope_scaling_factor) == ("llama3", 8.0)  # (8 frequencies: one on the ramp)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (load(back)[0](ids) - hf_logits(model, ids)).abs().max().item() < 1e-4
