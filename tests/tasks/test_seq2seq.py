"""Encoder-decoders: greedy/beam decoding (exhaustive search, Hugging Face parity), BART interop, and
`kiln finetune seq2seq` / `kiln translate` end to end (translation and summarization, bad inputs)."""

import csv
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, assert_user_error
from kiln.cli import main
from kiln.errors import KilnError
from kiln.model.beam import beam_search, greedy, strip
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer

BIBLE = ASSETS / "bible_en_es_400.tsv"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run faster on one thread


def tiny_seq2seq(**kw):
    base = dict(arch="encoder-decoder", vocab_size=40, n_layer=2, n_head=4, d_model=32, context_length=32)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


def padded_sources(V=40, lengths=(9, 6, 4), pad=0):
    torch.manual_seed(1)
    src = torch.randint(3, V, (len(lengths), max(lengths)))
    mask = torch.zeros_like(src, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return src.masked_fill(~mask, pad), mask


# ----------------------------------------------------------------------------------------------- decoding


class MarkovToy(torch.nn.Module):
    """Next-token log-probs depend only on the last token and its position (table [T, V, V], or [V, V] for
    any position): every hypothesis's score can be enumerated."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table if table.dim() == 3 else table.expand(16, -1, -1))
        V = table.shape[-1]
        self.config = ModelConfig(arch="encoder-decoder", vocab_size=V, n_layer=1, n_head=1, d_model=2,
                                  context_length=64)

    def encode(self, src, src_mask=None):
        return torch.zeros(src.shape[0], src.shape[1], 1)

    def forward(self, idx, memory=None, src_mask=None, **kw):
        return self.table[torch.arange(idx.shape[1])[None, :], idx]


def brute_force(table, bos, eos, max_new, lp):
    """Every hypothesis Hugging Face's beam search can finish: eos-terminated ones and max-length ones."""
    V = table.shape[-1]
    out = []
    for n in range(1, max_new + 1):
        for toks in itertools.product(range(V), repeat=n):
            if eos in toks[:-1] or (toks[-1] != eos and n < max_new):
                continue
            prev, total = bos, 0.0
            for pos, t in enumerate(toks):
                total += float(table[pos, prev, t])
                prev = t
            out.append((total / n ** lp, list(toks)))
    return sorted(out, key=lambda x: -x[0])


@pytest.mark.parametrize("lp", [0.0, 0.5, 1.0, 2.0, -1.0])
def test_wide_beam_search_is_exhaustive_search(lp):
    g = torch.Generator().manual_seed(3)
    table = torch.randn(5, 4, 4, generator=g).mul(2).log_softmax(-1)
    out = beam_search(MarkovToy(table), torch.zeros(1, 1, dtype=torch.long), num_beams=128, max_new_tokens=4,
                      bos_id=0, eos_id=1, pad_id=1, length_penalty=lp, early_stopping="never",
                      num_return_sequences=5, use_cache=False)
    want = brute_force(table, 0, 1, 4, lp)[:5]
    got = [s[1:] for s in out.sequences.tolist()]
    for (score, toks), row, s in zip(want, got, out.scores.tolist()):
        assert row[:len(toks)] == toks and all(t == 1 for t in row[len(toks):])
        assert s == pytest.approx(score, abs=1e-5)


def test_length_penalty_changes_the_pick():
    p = torch.tensor([[0.0, 0.40, 0.35, 0.25],   # from bos: eos 0.40, a 0.35
                      [0.25, 0.25, 0.25, 0.25],
                      [0.0, 0.90, 0.05, 0.05],   # from a: eos 0.90
                      [0.0, 0.50, 0.25, 0.25]]).clamp_min(1e-9).log()
    model, src = MarkovToy(p), torch.zeros(1, 1, dtype=torch.long)

    def best(lp):
        out = beam_search(model, src, num_beams=3, max_new_tokens=5, bos_id=0, eos_id=1, length_penalty=lp,
                          early_stopping="never", use_cache=False)
        return strip(out.sequences, 1)[0], float(out.scores[0])

    assert best(0.0) == ([], pytest.approx(math.log(0.40)))           # raw sum: stop at once
    toks, score = best(1.0)                                           # per-token mean: "a eos" is better
    assert toks == [2] and score == pytest.approx((math.log(0.35) + math.log(0.9)) / 2)
    assert greedy(model, src, max_new_tokens=5, bos_id=0, eos_id=1, use_cache=False).tolist() == [[0, 1]]


@pytest.mark.parametrize("kw", [dict(), dict(position="sinusoidal", pre_norm=False, final_norm=False,
                                                embed_scale=True, activation="relu", n_kv_head=2)])
def test_cache_beam1_and_padding_are_consistent(kw):
    torch.manual_seed(0)
    model = tiny_seq2seq(**kw)
    src, mask = padded_sources()
    args = dict(max_new_tokens=12, bos_id=1, eos_id=2, pad_id=0)
    cached = greedy(model, src, mask, **args)
    assert torch.equal(cached, greedy(model, src, mask, use_cache=False, **args))
    assert torch.equal(cached, beam_search(model, src, mask, num_beams=1, **args).sequences)
    beams = beam_search(model, src, mask, num_beams=3, length_penalty=1.0, early_stopping=True, **args)
    nocache = beam_search(model, src, mask, num_beams=3, length_penalty=1.0, early_stopping=True, use_cache=False,
                          **args)
    assert torch.equal(beams.sequences, nocache.sequences)
    assert torch.allclose(beams.scores, nocache.scores, atol=1e-5)
    for i in range(3):  # a padded batch decodes each source as if it were alone
        n = int(mask[i].sum())
        alone = beam_search(model, src[i:i + 1, :n], None, num_beams=3, early_stopping=True, **args)
        assert alone.sequences[0].tolist() == beams.sequences[i, :alone.sequences.shape[1]].tolist()
        assert float(alone.scores[0]) == pytest.approx(float(beams.scores[i]), abs=1e-5)


# ----------------------------------------------------------------------------------------------- BART + HF parity


def _tiny_bart(tmp_path, seed):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=40, scale_embedding=True,
                                  init_std=0.2, decoder_start_token_id=0)
    hf = transformers.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a constant boost of the eos logit, so hypotheses end at many different lengths
        e = hf.model.shared.weight[2]
        hf.model.decoder.layers[-1].final_layer_norm.bias += 2.0 * e / e.dot(e)
    hf.save_pretrained(tmp_path / f"hf{seed}")
    return hf, tmp_path / f"hf{seed}"


def test_bart_import_export_logits_greedy_and_beam_match_huggingface(tmp_path):
    from kiln.api import evaluate as kiln_evaluate
    from kiln.api import load
    from kiln.interop.hf import export_hf, import_hf

    import transformers
    src, mask = padded_sources(V=64, lengths=(10, 7, 4, 9), pad=1)
    no_processors = dict(forced_eos_token_id=None, forced_bos_token_id=None, no_repeat_ngram_size=0, min_length=0,
                         repetition_penalty=1.0, do_sample=False)
    ends, differs = set(), False
    for seed in (2, 4):
        hf, folder = _tiny_bart(tmp_path, seed)
        import_hf(folder, tmp_path / f"kiln{seed}")
        model, _, _ = load(tmp_path / f"kiln{seed}")
        dec = torch.randint(3, 64, (4, 6))
        dec[:, 0] = 0
        with torch.no_grad():
            want = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
            got = model(dec, src=src, src_mask=mask)
        assert (want - got).abs().max() <= 1e-4
        args = dict(max_new_tokens=12, bos_id=0, eos_id=2, pad_id=1)
        hf_greedy = hf.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=12, num_beams=1,
                                **no_processors)
        assert torch.equal(hf_greedy, greedy(model, src, mask, **args))
        by_es = {}
        for lp in (0.0, 1.0, 3.0):
            for es in (True, False):
                ref = hf.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=12, num_beams=4,
                                  length_penalty=lp, early_stopping=es, output_scores=True,
                                  return_dict_in_generate=True, **no_processors)
                out = beam_search(model, src, mask, num_beams=4, length_penalty=lp, early_stopping=es, **args)
                assert torch.equal(ref.sequences, out.sequences), (seed, lp, es)
                assert torch.allclose(ref.sequences_scores, out.scores, atol=1e-5)
                ends |= {r.index(2) if 2 in r else -1 for r in out.sequences[:, 1:].tolist()}
                by_es[(lp, es)] = out.sequences
            differs |= not torch.equal(by_es[(lp, True)], by_es[(lp, False)]) if by_es[(lp, True)].shape == \
                by_es[(lp, False)].shape else True
        if seed == 2:  # kiln -> HF again: the exported folder loads in transformers with the same logits
            export_hf(tmp_path / "kiln2", tmp_path / "back")
            back = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
            with torch.no_grad():
                again = back(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
            assert (again - want).abs().max() <= 1e-5
    assert -1 in ends and len(ends - {-1}) >= 3  # hypotheses ended by eos at several lengths, and by max length
    assert differs  # early_stopping True and False took different decisions somewhere
    (tmp_path / "text.txt").write_text("some text\n")  # kiln eval scores text with decoders and encoders only
    err = pytest.raises(KilnError, kiln_evaluate, tmp_path / "kiln2", tmp_path / "text.txt").value
    assert "encoder-decoder" in str(err) and "kiln finetune seq2seq" in str(err)


# ----------------------------------------------------------------------------------------------- data


def write_tsv(path: Path, rows, header=("ref", "en", "es")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def s2s_args(train, out, *extra):
    return ["finetune", "seq2seq", "--data.train", train, "--out", out, "--seq2seq.source_field", "en",
            "--seq2seq.target_field", "es", *TINY_S2S, *extra]


TINY_S2S = ["--model.d_model", "32", "--model.n_layer", "2", "--model.n_head", "2", "--model.d_ff", "64",
            "--model.context_length", "64", "--data.max_source_length", "48", "--data.max_target_length", "48",
            "--seq2seq.vocab_size", "300", "--train.max_steps", "12", "--train.batch_size", "16",
            "--train.eval_every", "6", "--train.warmup_steps", "2", "--train.lr", "3e-3",
            "--seq2seq.eval_examples", "6", "--seq2seq.num_beams", "2", "--seq2seq.max_new_tokens", "16",
            "--data.val_size", "12", "--data.test_size", "12", "--train.threads", "1",
            "--train.tensorboard", "false", "--train.precision", "fp32", "--train.log_every", "6"]


def test_bad_pair_files_are_one_line_errors(tmp_path, capsys):
    from kiln.data.pairs import read_pairs

    rows = [(f"v{i}", f"the word {i}", f"la palabra {i}") for i in range(30)]
    empty = write_tsv(tmp_path / "empty.tsv", rows[:10] + [("v", "no target here", "")] + rows[10:])
    pairs, report = read_pairs(empty, "en", "es")
    assert len(pairs) == 30 and report.empty_target == 1
    assert "skipped 1 row(s) with an empty target" in report.lines()[0] and "line 12" in report.lines()[0]

    bad = tmp_path / "fields.tsv"
    bad.write_text("ref\ten\tes\na\tone\tuno\nb\ttwo\tdos\textra\n", encoding="utf-8")
    assert_user_error(capsys, s2s_args(bad, tmp_path / "r1"), "fields.tsv:3", "expected 3 fields")
    assert_user_error(capsys, s2s_args(empty, tmp_path / "r2", "--seq2seq.target_field", "fr"),
                      "no target column 'fr'", "columns present: 'ref', 'en', 'es'")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("en\tes\nthe year\tel año\n".encode("latin-1"))
    assert_user_error(capsys, s2s_args(latin, tmp_path / "r3"), "latin.tsv", "not UTF-8", "iconv")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()  # nothing created on bad input


def test_split_is_seeded_and_keeps_identical_sources_together():
    from kiln.data.pairs import Pair, dedup, split_pairs

    rng = random.Random(0)
    pairs = [Pair(f"source {rng.randrange(60)}", f"target {i}", i) for i in range(300)]
    pairs += pairs[:5]  # exact duplicates
    kept, dropped = dedup(pairs)
    assert dropped == 5
    a = split_pairs(kept, 10, 10, seed=7)
    assert a[:3] == split_pairs(kept, 10, 10, seed=7)[:3]
    assert a[:3] != split_pairs(kept, 10, 10, seed=8)[:3]
    sources = [{p.source for p in part} for part in a[:3]]
    assert len(sources[1]) == len(sources[2]) == 10
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    assert sum(len(p) for p in a[:3]) == len(kept)


def test_objective_counts_only_real_target_tokens():
    from kiln.tasks.seq2seq_decode import collate
    from kiln.train.objectives import Seq2SeqLM

    torch.manual_seed(0)
    model = tiny_seq2seq()
    src, tgt = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14]]
    batch = collate(src, tgt, pad=0, bos=1, eos=2)
    assert batch["labels"].tolist() == [[10, 11, 12, 13, 2], [14, 2, -100, -100, -100]]
    assert batch["decoder_input_ids"].tolist() == [[1, 10, 11, 12, 13], [1, 14, 0, 0, 0]]
    obj = Seq2SeqLM(label_smoothing=0.1)
    assert obj.targets(batch) == 7
    with torch.no_grad():
        alone = sum(float(obj.loss(model, collate([s], [t], 0, 1, 2))) for s, t in zip(src, tgt))
        assert float(obj.loss(model, batch)) == pytest.approx(alone, rel=1e-5)  # padding changes nothing


# ----------------------------------------------------------------------------------------------- end to end


def test_finetune_translate_end_to_end_and_translate_cli(tmp_path, capsys):
    rows = list(csv.reader(open(BIBLE, encoding="utf-8"), delimiter="\t"))[1:121]
    rows.insert(5, ("Gen x", "An English verse without translation.", ""))
    data = write_tsv(tmp_path / "pairs.tsv", rows)
    run = tmp_path / "run"
    assert main([str(a) for a in s2s_args(data, run, "--seq2seq.tokenizer", "separate")]) == 0
    log = (run / "log.txt").read_text()
    assert "skipped 1 row(s) with an empty target" in log
    assert "  src: " in (run / "samples.txt").read_text() and "  out: " in log
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_loss", "val_bleu", "val_chrf"} <= set(header)
    assert (run / "plots" / "bleu.png").stat().st_size > 0 and (run / "plots" / "loss.png").is_file()
    result = json.loads((run / "eval" / "test.json").read_text())
    import sacrebleu  # the test BLEU is sacrebleu's corpus BLEU of the outputs written beside it, pair by pair

    decoded = list(csv.DictReader(open(run / "eval" / "test_outputs.tsv", encoding="utf-8"), delimiter="\t"))
    assert result["test"]["examples"] == len(decoded) == 12
    assert {(o["source"], o["reference"]) for o in decoded} <= {(r[1], r[2]) for r in rows}  # real held-out pairs
    assert result["test"]["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu([o["output"] for o in decoded], [[o["reference"] for o in decoded]]).score)
    assert [h["step"] for h in result["train"]["history"]] == [6, 12]
    splits = json.loads((run / "data.json").read_text())["splits"]
    assert (splits["train"]["pairs"], splits["val"]["pairs"], splits["test"]["pairs"]) == (96, 12, 12)
    capsys.readouterr()

    assert main(["translate", str(run), "--text", "God saw the light.", "--text", "And it was so.",
                 "--num-beams", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    refs = write_tsv(tmp_path / "refs.tsv", rows[:3])
    assert main(["translate", str(run), "--file", str(refs)]) == 0
    out = capsys.readouterr().out
    assert "bleu" in out and "chrf" in out
    assert_user_error(capsys, ["translate", str(tmp_path)], "not a seq2seq run folder")
    other = tmp_path / "classify-run"  # another kind of run is named as what it is
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"kind": "classify"}))
    assert_user_error(capsys, ["translate", str(other)], "not a seq2seq run folder (it holds a classify run)")

    # kiln eval: the same decoding, scored, as JSON with the outputs beside it
    assert main(["eval", str(run), str(refs), "--num-beams", "1"]) == 0
    got = json.loads((run / "eval" / "refs.json").read_text())
    outputs = list(csv.DictReader(open(run / "eval" / "refs.tsv", encoding="utf-8"), delimiter="\t"))
    assert got["pairs"] == len(outputs) == 3 and got["num_beams"] == 1 and got["task"] == "translate"
    assert [o["reference"] for o in outputs] == [r[2] for r in rows[:3]]
    import sacrebleu

    from kiln.tasks.seq2seq import translate

    hyps, refs_ = [o["output"] for o in outputs], [o["reference"] for o in outputs]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs_]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs_]).score)
    assert [o["output"] for o in outputs] == translate(run, [r[1] for r in rows[:3]], num_beams=1)
    sources = tmp_path / "sources.txt"  # sources alone: nothing to score against, an error (not BLEU 0)
    sources.write_text("God saw the light.\n")
    assert_user_error(capsys, ["eval", run, sources], "sources.txt", "no target text", "'en', 'es'")


def test_summarization_runs_through_the_same_pipeline(tmp_path):
    rng = random.Random(0)
    words = "sun moon star tree river stone bird fish cloud rain wind fire".split()

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 6))).capitalize() + "."

    rows = []
    for i in range(150):
        sents = [sentence() for _ in range(rng.randint(2, 3))]
        rows.append({"document": " ".join(sents), "summary": sents[0]})
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    run = tmp_path / "sum"
    argv = s2s_args(data, run, "--seq2seq.task", "summarize", "--seq2seq.source_field", "document",
                    "--seq2seq.target_field", "summary", "--train.max_steps", "60", "--train.eval_every", "30",
                    "--train.lr", "1e-2", "--seq2seq.label_smoothing", "0", "--seq2seq.num_beams", "1")
    assert main([str(a) for a in argv]) == 0
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_rouge1", "val_rouge2", "val_rougeL"} <= set(header) and "val_bleu" not in header
    assert (run / "plots" / "rouge.png").is_file()
    test = json.loads((run / "eval" / "test.json").read_text())["test"]
    assert set(test) >= {"rouge1", "rouge2", "rougeL"} and test["rouge1"] > 0.0


def test_text_metrics():
    from kiln.eval.text_metrics import text_metrics

    refs = ["the cat sat on the mat", "a dog barked"]
    perfect = text_metrics("translate", refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert text_metrics("translate", ["completely different words", "nothing"], refs)["bleu"] < 5.0
    r = text_metrics("summarize", ["the cat sat", "a dog barked"], refs)
    assert r["rouge1"] == pytest.approx(100 * (2 * 3 / 9 + 1.0) / 2, rel=1e-6)  # F1 of 3/3 vs 3/6, and 1.0
    with pytest.raises(KilnError):
        text_metrics("poetry", refs, refs)


def test_teacher_forcing_and_decoding_agree_a_model_memorises_its_pairs():
    """Targets shifted right by one (bos + target -> target + eos): a small model trained on 32 verse pairs
    reproduces them with greedy decoding."""
    from kiln.data.tokenizer import train_tokenizer
    from kiln.eval.text_metrics import bleu
    from kiln.data.pairs import Pair, PairCodec
    from kiln.tasks.seq2seq_decode import DecodeOptions, PairBatches, decode_ids, encode_pairs
    from kiln.train.objectives import Seq2SeqLM

    torch.manual_seed(0)
    rows = list(csv.reader(open(BIBLE, encoding="utf-8"), delimiter="\t"))[1:33]
    pairs = [Pair(r[1], r[2]) for r in rows]
    codec = PairCodec(train_tokenizer("bpe", [x for p in pairs for x in (p.source, p.target)], 500))
    enc = encode_pairs(codec, pairs, 64, 64, "pairs")
    model = Transformer(ModelConfig(arch="encoder-decoder", vocab_size=codec.vocab_size, n_layer=2, n_head=4,
                                    d_model=64, context_length=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches, objective = PairBatches(enc, 16, 0, codec.pad, codec.bos, codec.eos), Seq2SeqLM()
    for i in range(200):
        batch = batches.batch(i)
        loss = objective.loss(model, batch) / objective.targets(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hyps = decode_ids(model, codec, enc.src, DecodeOptions(num_beams=1, max_new_tokens=63))
    assert bleu(hyps, [p.target for p in pairs]) > 80.0
