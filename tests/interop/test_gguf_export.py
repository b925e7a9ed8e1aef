"""`kiln export gguf` read back by transformers' GGUF loader (the independent reader): SmolLM2-135M-Instruct
(llama, imported from its GGUF file) and a small GPT-2, f32 within 1e-4 of kiln's logits; Q8_0 within the
error its quantization step allows."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from test_gguf import smollm_file  # noqa: E402

from kiln.cli import main  # noqa: E402
from kiln.interop.gguf_read import import_gguf, open_gguf  # noqa: E402
from kiln.run.load import load  # noqa: E402

TEXTS = ["The capital of France is Paris, and the capital of Italy is",
         "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def smollm_run(tmp_path_factory) -> Path:
    return import_gguf(smollm_file(), tmp_path_factory.mktemp("export") / "smollm2")


def logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids])
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def transformers_load(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_f32_export_loads_in_transformers_with_kiln_logits(smollm_run, tmp_path, capsys):
    out = tmp_path / "smollm2-f32.gguf"
    assert main(["export", "gguf", str(smollm_run), str(out)]) == 0
    assert "ollama create" in capsys.readouterr().out
    model, tokenizer, _ = load(smollm_run)
    reference = transformers_load(out)
    worst = max((logits(model, tokenizer, t) - logits(reference, tokenizer, t)).abs().max().item() for t in TEXTS)
    assert worst < 1e-4, worst
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)  # tokenizer and template
    messages = [{"role": "user", "content": "Hi 123"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\nHi 123<|im_end|>\n<|im_start|>assistant\n")
    assert hf_tok.encode(TEXTS[1], add_special_tokens=False) == tokenizer.encode(TEXTS[1], add_special_tokens=False).ids
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{out.name}\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_q8_0_export_is_the_quantized_weights_and_nothing_else(smollm_run, tmp_path):
    """The derived tolerance: each Q8_0 weight differs from kiln's by at most half its block's step
    (max|block| / 127, the fp16 scale's rounding allowed for); given those weights, transformers' logits are
    kiln's within fp32 noise (1e-4): the export adds no error beyond its quantization."""
    out = tmp_path / "smollm2-q8_0.gguf"
    assert main(["export", "gguf", str(smollm_run), str(out), "--dtype", "q8_0"]) == 0
    model, tokenizer, _ = load(smollm_run)
    reader = open_gguf(out)
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert kinds == {"Q8_0", "F32"}, kinds
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    w = model.decoder.embed.tokens.weight.detach().numpy()
    q = gguf.quants.dequantize(embed.data, embed.tensor_type).reshape(w.shape)
    step = np.abs(w.reshape(-1, 32)).max(1, keepdims=True) / 127
    assert (np.abs(q - w).reshape(-1, 32) <= step / 2 * (1 + 2**-10) + 1e-12).all()
    back = import_gguf(out, tmp_path / "q8_0-run")  # kiln with the quantized weights, dequantized
    quantized, _, _ = load(back)
    reference = transformers_load(out)
    full = max((logits(model, tokenizer, t) - logits(reference, tokenizer, t)).abs().max().item() for t in TEXTS)
    same = max((logits(quantized, tokenizer, t) - logits(reference, tokenizer, t)).abs().max().item() for t in TEXTS)
    assert same < 1e-4, same
    assert 0 < full < 5.0, full  # quantization moves the logits (about 1 at Q8_0 on SmolLM2), never wildly
    top = [(logits(model, tokenizer, t).argmax(-1) == logits(reference, tokenizer, t).argmax(-1)).float().mean()
           for t in TEXTS]
    assert min(top) >= 0.9, top


def test_gpt2_run_exports_to_gguf_gpt2(smollm_run, tmp_path):
    hf = tmp_path / "gpt2"
    # n_positions 1024: transformers reads GGUF context_length into n_ctx, and sizes GPT-2 positions by n_positions
    config = transformers.GPT2Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                     activation_function="gelu_new", tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf)
    shutil.copyfile(smollm_run / "tokenizer.json", hf / "tokenizer.json")
    assert main(["import", "hf", str(hf), str(tmp_path / "run")]) == 0
    out = tmp_path / "gguf" / "gpt2.gguf"
    assert main(["export", "gguf", str(tmp_path / "run"), str(out)]) == 0
    assert open_gguf(out).fields["general.architecture"].contents() == "gpt2"
    model, tokenizer, _ = load(tmp_path / "run")
    reference = transformers_load(out)
    worst = max((logits(model, tokenizer, t) - logits(reference, tokenizer, t)).abs().max().item() for t in TEXTS)
    assert worst < 1e-4, worst


def test_export_refuses_what_gguf_cannot_hold_in_one_line(tmp_path, capsys):
    hf = tmp_path / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32)).save_pretrained(hf)
    assert main(["import", "hf", str(hf), str(tmp_path / "run")]) == 0
    out = tmp_path / "out" / "bert.gguf"
    capsys.readouterr()
    assert main(["export", "gguf", str(tmp_path / "run"), str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "decoder" in err
    assert not out.exists() and not (tmp_path / "out" / "Modelfile").exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["kind"] == "pretrain"


def test_lora_tuned_merged_and_exported_loads_back_the_same(smollm_run, tmp_path, capsys):
    """SmolLM2 tuned with LoRA on a few conversations (kiln finetune chat), merged (kiln merge), exported: the
    GGUF file gives transformers the merged run's logits and greedy reply, and imports back to the same model."""
    rows = [{"messages": [{"role": "user", "content": f"What colour is the sky in Kilnland? ({i})"},
                          {"role": "assistant", "content": "The sky in Kilnland is green."}]} for i in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tuned, merged, out = tmp_path / "lora", tmp_path / "merged", tmp_path / "gguf" / "merged.gguf"
    assert main(["finetune", "chat", "--init", str(smollm_run), "--data.train", str(data), "--out", str(tuned),
                 "--train.max_steps", "1", "--train.batch_size", "2", "--train.lora.rank", "4", "--train.lr", "1e-2",
                 "--samples", "0", "--train.precision", "fp32", "--train.trackers", "none"]) == 0
    assert main(["merge", str(tuned), "--out", str(merged)]) == 0
    assert main(["export", "gguf", str(merged), str(out)]) == 0
    model, tokenizer, _ = load(merged)
    base = load(smollm_run)[0]
    assert (logits(model, tokenizer, TEXTS[1]) - logits(base, tokenizer, TEXTS[1])).abs().max().item() > 1e-2
    reference = transformers_load(out)
    back = load(import_gguf(out, tmp_path / "back"))[0]
    for text in TEXTS:
        want = logits(model, tokenizer, text)
        assert (logits(reference, tokenizer, text) - want).abs().max().item() < 1e-4
        assert (logits(back, tokenizer, text) - want).abs().max().item() < 1e-4
    capsys.readouterr()
    question = "What colour is the sky in Kilnland?"
    assert main(["chat", str(merged), "-m", question, "--max-new-tokens", "16", "--precision", "fp32",
                 "--device", "cpu"]) == 0
    reply = capsys.readouterr().out.removesuffix("\n")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    ids = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        new = reference.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    assert reply == hf_tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_every_dtype_round_trips_through_gguf(tmp_path, family):
    """A small random Llama (grouped-query attention) and Qwen2 (q/k/v biases): each dtype's file read by
    transformers and imported back by kiln gives the same logits (the same quantized weights, read twice), and
    f32 gives kiln's own."""
    from kiln.data.tokenizer import train_tokenizer, vocab_size

    hf = tmp_path / "hf"
    tok = train_tokenizer("bpe", [" ".join(TEXTS) * 20, "the sea, the sky and the sun " * 40], vocab_size=400)
    shape = dict(vocab_size=vocab_size(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
    torch.manual_seed(0)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=True))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    model.save_pretrained(hf)
    tok.save(str(hf / "tokenizer.json"))
    assert main(["import", "hf", str(hf), str(tmp_path / "run")]) == 0
    kiln_model, tokenizer, _ = load(tmp_path / "run")
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        out = tmp_path / dtype / f"{family}.gguf"
        assert main(["export", "gguf", str(tmp_path / "run"), str(out), "--dtype", dtype]) == 0
        assert open_gguf(out).fields["general.architecture"].contents() == family
        reference = transformers_load(out)
        back = load(import_gguf(out, tmp_path / dtype / "run"))[0]
        for text in TEXTS:
            want = logits(reference, tokenizer, text)
            assert (logits(back, tokenizer, text) - want).abs().max().item() < 1e-4, dtype
            if dtype == "f32":
                assert (logits(kiln_model, tokenizer, text) - want).abs().max().item() < 1e-4
