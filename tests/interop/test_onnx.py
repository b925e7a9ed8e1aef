"""`kiln export onnx`: classifiers (encoder and decoder backbones) and language models (a decoder with its KV
cache, an encoder) give kiln's outputs in onnxruntime within 1e-4 on random inputs of two lengths and batch sizes;
--int8 through onnxruntime's quantize_dynamic; the folder is usable alone; bad input is one line, exit 2."""

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, assert_user_error
from task_data import save_backbone
from kiln.cli import main

import onnxruntime  # noqa: F401  (a dev dependency: missing, the file fails to load, not skipped)
import onnx  # noqa: F401  (a dev dependency: missing, the file fails to load, not skipped)
pytestmark = pytest.mark.usefixtures("one_thread")

from kiln.interop import onnx as kx  # noqa: E402

POS, NEG = ["good", "great", "superb", "lovely"], ["bad", "awful", "poor", "dull"]
FILLER = ["the", "movie", "was", "plot", "actors", "really", "and", "a", "story", "film"]
FAST = ["--train.threads", "1", "--train.precision", "fp32", "--train.tensorboard", "false", "--seed", "0"]
TOL = 1e-4


def _reviews(n: int, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILLER, rng.randint(2, 6)) + [rng.choice(POS if label == "pos" else NEG)]
        rng.shuffle(words)
        rows.append((label, " ".join(words)))
    return rows


def _backbone(path: Path, arch: str) -> Path:
    """A tiny kiln run to fine-tune: a BERT-like encoder (post-norm, token types) or a Llama-like decoder
    (RoPE, RMSNorm, SwiGLU, grouped-query attention)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from kiln.model.config import ModelConfig

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + POS + NEG + FILLER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if arch == "encoder":
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        cfg = ModelConfig(arch="encoder", vocab_size=len(vocab), n_layer=2, n_head=2, d_model=16, context_length=32,
                          pre_norm=False, final_norm=False, embedding_norm=True, type_vocab_size=2, pad_token_id=0)
    else:
        cfg = ModelConfig(arch="decoder", vocab_size=len(vocab), n_layer=2, n_head=4, n_kv_head=2, d_model=16,
                          context_length=32, position="rope", norm="rmsnorm", activation="swiglu", bias=False)
    return save_backbone(path, tok, cfg)


@pytest.fixture(scope="module", params=["encoder", "decoder"])
def classifier(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"clf-{request.param}")
    data = root / "reviews.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([("label", "text"), *_reviews(200)])
    run = root / "run"
    assert main(["finetune", "classify", "--data.train", str(data), "--init", str(_backbone(root / "base", request.param)),
                 "--out", str(run), "--data.max_length", "12", "--epochs", "4", "--train.batch_size", "8",
                 "--train.lr", "1e-2", *FAST]) == 0
    out = root / "onnx"
    assert main(["export", "onnx", str(run), str(out), "--int8"]) == 0
    return run, out


def test_classifier_folder_is_complete_and_usable_alone(classifier):
    run, out = classifier
    for f in ("model.onnx", "model.int8.onnx", "tokenizer.json", "kiln-onnx.json", "report.json"):
        assert (out / f).is_file(), f
    assert not list(out.parent.glob(".onnx.tmp-*"))
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's private one
    meta = json.loads((out / "kiln-onnx.json").read_text())
    assert meta["labels"] == ["neg", "pos"] and meta["text_field"] == "text" and meta["max_length"] == 12
    assert meta["kind"] == "classifier" and meta["opset"] == kx.OPSET
    encoder = kx.load_run(run).cfg.arch == "encoder"
    assert meta["inputs"] == ["input_ids", "attention_mask"] + (["token_type_ids"] if encoder else [])

    # only onnxruntime, tokenizers and the two JSON files: tokenize, pad, run, read the label
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.enable_truncation(meta["max_length"])
    tok.enable_padding(pad_id=meta["pad_token_id"])
    enc = tok.encode_batch(["a lovely superb film", "the plot was awful and the actors were dull"])
    feed = {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}
    if "token_type_ids" in meta["inputs"]:
        feed["token_type_ids"] = np.array([e.type_ids for e in enc], np.int64)
    sess = ort.InferenceSession(str(out / meta["model"]), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], feed)[0]
    assert [meta["labels"][i] for i in logits.argmax(-1)] == ["pos", "neg"]


def test_classifier_matches_kiln_on_random_inputs(classifier):
    run, out = classifier
    ex = kx.load_run(run)
    for path in (out / "model.onnx",):
        sess = kx.session(path, threads=1)
        for batch, length, seed in ((3, 5, 1), (1, 12, 2), (5, 9, 3)):
            feed = kx.random_inputs(ex, batch, length, seed=seed)
            got, ref = sess.run(None, feed)[0], kx.kiln_outputs(ex, feed)[0]
            assert got.shape == (batch, 2)
            assert np.abs(got - ref).max() < TOL


def test_classifier_report_has_the_test_split_accuracy(classifier):
    run, out = classifier
    r = json.loads((out / "report.json").read_text())
    recorded = json.loads((run / "eval" / "test.json").read_text())["accuracy"]
    res = r["results"]
    assert set(res) == {"kiln fp32", "onnxruntime fp32", "onnxruntime int8"}
    assert res["kiln fp32"]["accuracy"] == pytest.approx(recorded)  # the same split, encoded as the task does
    assert res["onnxruntime fp32"]["accuracy"] == res["kiln fp32"]["accuracy"]
    assert abs(res["onnxruntime int8"]["accuracy"] - recorded) <= 0.1  # 2 of 20 (tiny model, small margins)
    assert all(v["examples_per_second"] > 0 for v in res.values())
    assert r["parity"]["fp32"]["max_abs_diff"] < TOL and r["parity"]["fp32"]["argmax_agreement"] == 1.0
    assert set(r["size_mb"]) == {"model.onnx", "model.int8.onnx"}  # (int8 is larger here: 2k weights)
    assert r["data"].startswith("the run's test split (20 examples)")


@pytest.fixture(scope="module", params=["gpt", "llama"])
def decoder(request, tmp_path_factory):
    """A tiny decoder pretrained for 12 steps on Shakespeare: GPT-like (learned positions, LayerNorm, GELU, tied
    head) or Llama-like (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head)."""
    from conftest import SHAKESPEARE

    root = tmp_path_factory.mktemp(f"lm-{request.param}")
    corpus = root / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    extra = ["--model.position", "rope", "--model.norm", "rmsnorm", "--model.activation", "swiglu", "--model.n_kv_head",
             "1", "--model.tie_embeddings", "false", "--model.bias", "false"] if request.param == "llama" else []
    run = root / "run"
    assert main(["pretrain", "--data.source", str(corpus), "--out", str(run), *TINY, "--train.max_steps", "12", *extra]) == 0
    out = root / "onnx"
    assert main(["export", "onnx", str(run), str(out), "--int8"]) == 0
    return run, out


def test_decoder_prefill_and_cached_steps_match_kiln(decoder):
    run, out = decoder
    ex = kx.load_run(run)
    meta = json.loads((out / "kiln-onnx.json").read_text())
    assert meta["kind"] == "decoder" and meta["cache"]["n_layer"] == 2 and meta["context_length"] == 32
    sess = kx.session(out / "model.onnx", threads=1)
    # random inputs: two batch sizes and lengths, with and without a past (kiln's KV cache holds the same past)
    for batch, length, past in ((3, 6, 0), (1, 17, 0), (2, 4, 9), (4, 1, 13)):
        feed = kx.random_inputs(ex, batch, length, past, seed=batch + past)
        got, ref = sess.run(None, feed), kx.kiln_outputs(ex, feed)
        assert got[0].shape == (batch, length, ex.cfg.vocab_size) and got[1].shape[2] == past + length
        assert max(np.abs(g - r).max() for g, r in zip(got, ref)) < TOL
    # decoding through the graph's own cache (presents fed back) gives, step by step, kiln's logits over the
    # whole left-padded text without a cache; greedy tokens are kiln generate's
    tok = torch.tensor([[5, 9, 2, 7, 7, 1], [0, 0, 3, 8, 4, 6]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        want = ex.model.generate(tok, 8, greedy=True, attention_mask=mask.bool())
    got = kx.greedy(sess, meta["cache"], tok.numpy(), 8, mask.numpy())
    assert (got == want.numpy()).all()
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = ex.model(want, attention_mask=full_mask.bool(),
                       position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0))
    feed = {"input_ids": tok.numpy(), "attention_mask": mask.numpy(),
            **{n: np.zeros((2, meta["cache"]["n_kv_head"], 0, meta["cache"]["head_dim"]), np.float32)
               for n in meta["cache"]["inputs"]}}
    steps = []
    for i in range(8):
        logits, *presents = sess.run(None, feed)
        steps.append(logits[:, -1])
        m = full_mask[:, :6 + i + 1].numpy()
        feed = {"input_ids": want[:, 6 + i:7 + i].numpy(), "attention_mask": m,
                **dict(zip(meta["cache"]["inputs"], presents))}
    assert np.abs(np.stack(steps, 1) - ref[:, 5:13].numpy()).max() < TOL


def test_decoder_report_and_int8(decoder):
    run, out = decoder
    r = json.loads((out / "report.json").read_text())
    assert r["parity"]["fp32"]["max_abs_diff"] < TOL
    assert r["parity"]["int8"]["argmax_agreement"] > 0.5
    for row in r["results"].values():
        assert row["sequences_per_second"] > 0 and row["greedy_tokens_per_second"] > 0
    meta = json.loads((out / "kiln-onnx.json").read_text())
    ex = kx.load_run(run)
    sess = kx.session(out / meta["model_int8"], threads=1)
    feed = kx.random_inputs(ex, 2, 7, 3)
    assert sess.run(None, feed)[0].shape == (2, 7, ex.cfg.vocab_size)
    assert (out / "tokenizer.json").is_file()


def test_encoder_language_model(tmp_path):
    """A masked-LM pretraining run: input_ids, attention_mask -> logits over the vocabulary."""
    from conftest import SHAKESPEARE

    corpus = tmp_path / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:10_000])
    run = tmp_path / "run"
    assert main(["pretrain", "--data.source", str(corpus), "--out", str(run), *TINY, "--train.max_steps", "3",
                 "--model.arch", "encoder", "--objective", "mlm"]) == 0
    ex = kx.load_run(run)
    out = tmp_path / "onnx"
    r = kx.export_onnx(run, out, log=lambda *_: None, report=False)
    assert r["parity"]["fp32"]["max_abs_diff"] < TOL
    sess = kx.session(out / "model.onnx", threads=1)
    for b, t in ((2, 9), (1, 30)):
        feed = kx.random_inputs(ex, b, t, seed=t)
        assert np.abs(sess.run(None, feed)[0] - kx.kiln_outputs(ex, feed)[0]).max() < TOL


def test_bad_input_is_one_line(tmp_path, capsys, classifier):
    run, out = classifier
    fake = tmp_path / "s2s"
    fake.mkdir()
    (fake / "run.json").write_text(json.dumps({"kind": "seq2seq", "config": "seq2seq.yaml"}))
    assert_user_error(capsys, ["export", "onnx", fake, tmp_path / "o1"], "is a seq2seq run", "not supported")
    assert_user_error(capsys, ["export", "onnx", tmp_path / "nothing", tmp_path / "o2"], "not found")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(capsys, ["export", "onnx", run, blocker / "sub"], "cannot write", "file")
    assert_user_error(capsys, ["export", "onnx", run, blocker], "is a file")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert_user_error(capsys, ["export", "onnx", run, busy], "not a kiln ONNX export")
    assert (busy / "keep.txt").read_text() == "mine" and sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_kiln_quantize_run_is_refused(tmp_path, capsys):
    from conftest import SHAKESPEARE

    corpus = tmp_path / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:5_000])
    run, q = tmp_path / "run", tmp_path / "q"
    assert main(["pretrain", "--data.source", str(corpus), "--out", str(run), *TINY, "--train.max_steps", "2"]) == 0
    assert main(["quantize", str(run), "--out", str(q)]) == 0
    capsys.readouterr()
    assert_user_error(capsys, ["export", "onnx", q, tmp_path / "o"], "kiln quantize's int8 weights", str(run), "--int8")
    assert not (tmp_path / "o").exists()
