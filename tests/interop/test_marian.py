"""Marian (MarianMTModel, the opus-mt family): `kiln import hf` -> kiln logits == HF logits, greedy and beam
decoding token for token, `kiln export hf` -> transformers loads the same model; Marian's sin|cos position
layout, final_logits_bias, untied heads, old checkpoints holding the position tables; `kiln finetune seq2seq
--init` from an HF Marian folder, an imported run and a seq2seq run, exported back to MarianMTModel.

Tiny random models built from a MarianConfig and saved to tmp_path: nothing is downloaded."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
transformers.logging.set_verbosity_error()

from safetensors.torch import load_file  # noqa: E402

from conftest import ASSETS, assert_user_error  # noqa: E402
from kiln.api import load  # noqa: E402
from kiln.cli import main  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.interop import hf, marian  # noqa: E402
from kiln.interop.hf import export_hf, import_hf  # noqa: E402
from kiln.model.beam import beam_search, greedy  # noqa: E402
from kiln.model.config import ModelConfig  # noqa: E402
from kiln.model.layers import sinusoidal_table  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run faster on one thread

BIBLE = ASSETS / "bible_en_es_400.tsv"
TOL = 1e-4
V, EOS, PAD = 64, 0, 63  # opus-mt's layout: </s> = 0, <pad> = the last id = the decoder start token


def marian_config(vocab=V, pad=PAD, **kw):
    base = dict(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                activation_function="swish", scale_embedding=True, pad_token_id=pad, decoder_start_token_id=pad,
                eos_token_id=EOS, forced_eos_token_id=EOS, dropout=0.1)
    return transformers.MarianConfig(**{**base, **kw})


def make_marian(path, seed=0, noise=0.05, **kw):
    """A random tiny MarianMTModel saved to `path`. Every parameter gets noise (HF inits biases at 0 and norm
    weights at 1, which would hide a swapped bias or norm), final_logits_bias too (zero in a fresh model, not
    in opus-mt checkpoints)."""
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(marian_config(**kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # not the frozen sinusoidal tables
                p.add_(torch.randn(p.shape, generator=g) * noise)
        model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=g))
        if not model.config.tie_word_embeddings:  # transformers unties every table then; opus-mt's are one
            for emb in (model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
                emb.weight.copy_(model.model.shared.weight)
    model.save_pretrained(path)
    return model


def sources(lengths=(10, 7, 4, 9), vocab=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, vocab - 1, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return src.masked_fill(~mask, PAD), mask


def decoder_inputs(B=4, T=7, vocab=V, seed=2):
    dec = torch.randint(1, vocab - 1, (B, T), generator=torch.Generator().manual_seed(seed))
    dec[:, 0] = PAD  # the decoder start token
    return dec


def delta(a, b) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------- parity


def test_sinusoid_halves_layout_is_marians():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    for n, d in ((64, 32), (20, 7)):  # odd widths: one more sine than cosine, as in transformers
        assert torch.equal(sinusoidal_table(n, d, "halves"), MarianSinusoidalPositionalEmbedding(n, d).create_weight())
    interleaved = sinusoidal_table(8, 6)
    halves = sinusoidal_table(8, 6, "halves")
    assert torch.allclose(interleaved[:, 0::2], halves[:, :3], atol=1e-6)  # the same angles, laid out apart
    assert torch.allclose(interleaved[:, 1::2], halves[:, 3:], atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_marian_import_export_logits_and_decoding_match_huggingface(tmp_path, tied):
    ref = make_marian(tmp_path / "hf", tie_word_embeddings=tied)
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model, tok, cfg = load(run)
    m = cfg.model
    assert tok is None  # no tokenizer.json in the folder (a logit check needs none)
    assert (m.position, m.sinusoid_layout, m.head_bias, m.pre_norm, m.embedding_norm, m.embed_scale,
            m.tie_embeddings, m.activation) == ("sinusoidal", "halves", True, False, False, True, tied, "silu")
    assert torch.equal(model.lm_head.bias, ref.final_logits_bias[0])
    src, mask = sources()
    dec = decoder_inputs()
    with torch.no_grad():
        want = ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
        got = model(dec, src=src, src_mask=mask)
        print(f"marian import (tied={tied}): max |kiln - HF| logit = {delta(got, want):.2e}")
        assert delta(got, want) <= TOL

        # greedy and beam search, token for token (transformers' default processors off)
        off = dict(forced_eos_token_id=None, forced_bos_token_id=None, no_repeat_ngram_size=0, min_length=0,
                   repetition_penalty=1.0, do_sample=False, bad_words_ids=None)
        args = dict(max_new_tokens=10, bos_id=PAD, eos_id=EOS, pad_id=PAD)
        hf_greedy = ref.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=10, num_beams=1, **off)
        assert torch.equal(hf_greedy, greedy(model, src, mask, **args))
        hf_beam = ref.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=10, num_beams=3,
                               output_scores=True, return_dict_in_generate=True, **off)
        beam = beam_search(model, src, mask, num_beams=3, **args)
        assert torch.equal(hf_beam.sequences, beam.sequences)
        assert torch.allclose(hf_beam.sequences_scores, beam.scores, atol=1e-5)

        out = export_hf(run, tmp_path / "export")
        back = transformers.MarianMTModel.from_pretrained(out).eval()
        again = back(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
        print(f"marian export (tied={tied}): max |HF(exported) - kiln| logit = {delta(again, got):.2e}")
        assert delta(again, got) <= TOL
    exported, original = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(exported) <= set(original) | {"model.shared.weight"}
    assert set(exported) == set(original) or tied
    for name, t in exported.items():
        assert torch.equal(t, original.get(name, original.get("model.encoder.embed_tokens.weight"))), name
    cfg_out = json.loads((out / "config.json").read_text())
    assert (cfg_out["model_type"], cfg_out["pad_token_id"], cfg_out["decoder_start_token_id"],
            cfg_out["eos_token_id"]) == ("marian", PAD, PAD, EOS)
    assert hf.family_for(m) is marian


def test_old_checkpoint_with_position_tables_and_base_model_names(tmp_path):
    """Older opus-mt files hold the sinusoidal tables (checked, then dropped); a MarianModel checkpoint has no
    `model.` prefix and no final_logits_bias (zeros, as transformers starts it)."""
    ref = make_marian(tmp_path / "hf", seed=3)
    src_dir = tmp_path / "old"
    src_dir.mkdir()
    (src_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    assert "model.encoder.embed_positions.weight" in state
    torch.save(state, src_dir / "pytorch_model.bin")
    model, _, _ = load(import_hf(src_dir, tmp_path / "run"))
    src, mask = sources()
    dec = decoder_inputs()
    with torch.no_grad():
        want = ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
        assert delta(model(dec, src=src, src_mask=mask), want) <= TOL

    base = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    torch.save(base, src_dir / "pytorch_model.bin")
    model, _, _ = load(import_hf(src_dir, tmp_path / "run_base"))
    with torch.no_grad():
        hidden = ref.model(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).last_hidden_state
        assert delta(model(dec, src=src, src_mask=mask), ref.lm_head(hidden)) <= TOL  # no bias

    state["model.decoder.embed_positions.weight"] = torch.randn_like(state["model.decoder.embed_positions.weight"])
    torch.save(state, src_dir / "pytorch_model.bin")
    with pytest.raises(KilnError, match="not Marian's sinusoidal table"):
        import_hf(src_dir, tmp_path / "run_bad")


def test_unsupported_marian_configs_are_one_line_errors(tmp_path):
    good = marian_config().to_dict()
    for change, words in (({"share_encoder_decoder_embeddings": False}, "share_encoder_decoder_embeddings"),
                          ({"decoder_vocab_size": 80}, "decoder_vocab_size"),
                          ({"decoder_ffn_dim": 48}, "decoder_ffn_dim"),
                          ({"activation_function": "tanh"}, "activation_function")):
        with pytest.raises(KilnError) as e:
            marian.config_from_hf({**good, **change})
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(KilnError, match="sinusoid_layout"):
        marian.config_to_hf(ModelConfig(arch="encoder-decoder", vocab_size=V, position="sinusoidal"))
    with pytest.raises(KilnError, match="marian"):  # the interleaved table has no HF family
        hf.family_for(ModelConfig(arch="encoder-decoder", vocab_size=V, position="sinusoidal"))


# ----------------------------------------------------------------------------------------------- kiln finetune seq2seq --init


def marian_folder(path, seed=5) -> tuple[Path, int, int]:
    """An HF Marian folder as opus-mt's look once their tokenizer is converted: config.json, model.safetensors
    and a tokenizer.json (a small Unigram over the verses: </s> = 0, <unk> = 1, <pad> = the last id and the
    decoder start token). Returns (folder, vocab, pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rows = list(csv.reader(open(BIBLE, encoding="utf-8"), delimiter="\t"))[1:]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=160, special_tokens=["</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator((x for r in rows for x in r[1:3]), trainer)
    tok.add_special_tokens(["<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 0)])
    pad = tok.token_to_id("<pad>")
    make_marian(path, seed=seed, vocab=pad + 1, pad=pad)
    tok.save(str(path / "tokenizer.json"))
    return path, pad + 1, pad


FAST = ["--seq2seq.source_field", "en", "--seq2seq.target_field", "es", "--data.limit", "120",
        "--data.val_size", "6", "--data.test_size", "4", "--data.max_source_length", "40",
        "--data.max_target_length", "40", "--train.max_steps", "4", "--train.batch_size", "8",
        "--train.eval_every", "4", "--train.warmup_steps", "1", "--train.lr", "2e-3", "--train.log_every", "2",
        "--seq2seq.eval_examples", "3", "--seq2seq.num_beams", "1", "--seq2seq.max_new_tokens", "8",
        "--seq2seq.test_examples", "3", "--train.threads", "1", "--train.tensorboard", "false",
        "--train.precision", "fp32"]


def finetune(init, out, *extra) -> int:
    return main([str(a) for a in ["finetune", "seq2seq", "--init", init, "--data.train", BIBLE, "--out", out,
                                  *FAST, *extra]])


def test_finetune_seq2seq_init_from_marian_then_export_loads_in_transformers(tmp_path, capsys):
    from kiln.tasks.seq2seq import load_seq2seq, translate
    from kiln.tasks.seq2seq_decode import collate

    folder, vocab, pad = marian_folder(tmp_path / "opus-mt-tiny")
    run = tmp_path / "ft"
    assert finetune(folder, run) == 0
    meta = json.loads((run / "seq2seq.json").read_text())
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["source_eos"], meta["vocab_size"]) == \
        (pad, EOS, pad, True, vocab)  # Marian's ids: start = <pad>, eos = </s>; sources end with </s>
    assert meta["init"] == str(folder) and meta["init_kind"] == "huggingface"
    assert (run / "base" / "config.yaml").is_file() and (run / "hf_config.json").is_file()
    model, codec, cfg, _ = load_seq2seq(run)
    assert cfg.model.sinusoid_layout == "halves" and cfg.model.vocab_size == vocab
    start = transformers.MarianMTModel.from_pretrained(folder).eval()
    assert not torch.equal(model.lm_head.bias, start.final_logits_bias[0])  # it trained, the head's bias too
    assert json.loads((run / "eval" / "summary.json").read_text())["train"]["steps"] == 4

    capsys.readouterr()
    assert main(["export", "hf", str(run), str(tmp_path / "exported")]) == 0
    back = transformers.MarianMTModel.from_pretrained(tmp_path / "exported").eval()
    pairs = list(csv.reader(open(BIBLE, encoding="utf-8"), delimiter="\t"))[1:5]
    batch = collate(codec.encode_source([p[1] for p in pairs]), codec.encode_target([p[2] for p in pairs]),
                    codec.pad, codec.bos, codec.eos)
    with torch.no_grad():
        got = model(batch["decoder_input_ids"], src=batch["input_ids"], src_mask=batch["attention_mask"])
        want = back(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                    decoder_input_ids=batch["decoder_input_ids"]).logits
    print(f"fine-tuned marian export: max |HF - kiln| logit = {delta(got, want):.2e}")
    assert delta(got, want) <= TOL
    assert (back.config.decoder_start_token_id, back.config.eos_token_id, back.config.pad_token_id) == (pad, EOS, pad)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")  # the shared tokenizer.json
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("</s>", "<pad>")
    assert hf_tok(pairs[0][1])["input_ids"] == codec.encode_source([pairs[0][1]])[0]  # ... </s>, as Marian's
    assert isinstance(translate(run, ["God saw the light."], num_beams=1)[0], str)

    # --init an imported Marian run, and a seq2seq run (its codec kept)
    assert main(["import", "hf", str(folder), str(tmp_path / "imported")]) == 0
    assert finetune(tmp_path / "imported", tmp_path / "ft2", "--train.max_steps", "2") == 0
    assert json.loads((tmp_path / "ft2" / "seq2seq.json").read_text())["bos_id"] == pad
    assert finetune(run, tmp_path / "ft3", "--train.max_steps", "2", "--init_checkpoint", "best") == 0
    again = json.loads((tmp_path / "ft3" / "seq2seq.json").read_text())
    assert again["init_kind"] == "seq2seq" and {k: again[k] for k in ("bos_id", "eos_id", "pad_id", "source_eos")} \
        == {k: meta[k] for k in ("bos_id", "eos_id", "pad_id", "source_eos")}


def test_init_errors_are_one_line(tmp_path, capsys):
    make_marian(tmp_path / "no_tok")  # opus-mt as downloaded: SentencePiece files, no tokenizer.json
    (tmp_path / "no_tok" / "source.spm").write_bytes(b"")
    capsys.readouterr()  # drop transformers' progress output
    assert_user_error(capsys, ["finetune", "seq2seq", "--init", tmp_path / "no_tok", "--data.train", BIBLE,
                               "--out", tmp_path / "r1", *FAST], "no tokenizer.json", "source.spm", "vocab.json")
    assert not (tmp_path / "r1").exists()
    folder, _, _ = marian_folder(tmp_path / "tiny")
    capsys.readouterr()
    assert_user_error(capsys, ["finetune", "seq2seq", "--init", folder, "--data.train", BIBLE, "--out",
                               tmp_path / "r2", *FAST, "--seq2seq.tokenizer", "separate"], "does not apply with init")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=V))
    gpt2.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    capsys.readouterr()
    assert_user_error(capsys, ["finetune", "seq2seq", "--init", tmp_path / "gpt2", "--data.train", BIBLE, "--out",
                               tmp_path / "r3", *FAST], "decoder model", "encoder-decoder")
    assert not (tmp_path / "r3").exists()
