"""kiln finetune tokens: CoNLL / JSONL reading and its one-line errors, tag schemes, labels on the first
sub-token, seqeval entity F1 against a hand computation, the pipeline through the CLI on a tiny encoder (a
CoNLL set tagged by rule over Jane Austen, tests/assets/ner_austen.conll), and Hugging Face
BertForTokenClassification parity."""

import json

import pytest
import torch

from conftest import assert_user_error
from kiln.cli import main
from kiln.constants import IGNORE_INDEX
from kiln.data.conll import TokensDataConfig, check_tags, detect_scheme, encode_words, read_sentences, words_of
from kiln.errors import KilnError
from kiln.eval.tokens import entities, token_metrics
from task_data import ASSETS, make_backbone

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--train.threads", "1", "--train.precision", "fp32", "--train.tensorboard", "false", "--train.log_every",
        "50", "--seed", "0"]
NER = ASSETS / "ner_austen.conll"
TOL = 1e-4


def test_read_conll_columns_docstart_and_jsonl(tmp_path):
    f = tmp_path / "a.conll"
    f.write_text("-DOCSTART- -X- O\n\nEmma NNP B-PER\nwalked VBD O\n\n\nto TO O\nHighbury NNP B-LOC\n. . O\n")
    d = TokensDataConfig()
    s = read_sentences(f, d)
    assert [x.tokens for x in s] == [["Emma", "walked"], ["to", "Highbury", "."]]
    assert [x.tags for x in s] == [["B-PER", "O"], ["O", "B-LOC", "O"]] and [x.line for x in s] == [3, 7]
    assert s[1].text == "to Highbury ." and s[1].spans == [(0, 2), (3, 11), (12, 13)]
    d.tag_column = 1  # the POS column instead
    assert read_sentences(f, d)[0].tags == ["NNP", "VBD"]
    d.tag_column = 5
    with pytest.raises(KilnError, match="tag_column 5 is not a tag column of its 3 column"):
        read_sentences(f, d)
    plain = tmp_path / "plain.conll"  # tokens only: fine for predict, an error for training
    plain.write_text("Emma\nwalked\n")
    assert read_sentences(plain, TokensDataConfig(), require_tags=False)[0].tags is None
    with pytest.raises(KilnError, match="one column only: no tags"):
        read_sentences(plain, TokensDataConfig())

    j = tmp_path / "a.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in [
        {"tokens": ["Emma", "walked"], "tags": ["B-PER", "O"]},
        {"tokens": ["Mr.", "Knightley", "came"], "tags": ["B-PER", "I-PER", "O"], "text": "Mr.  Knightley came!"},
        {"text": "Miss Bates (of Highbury) talked."}]))
    s = read_sentences(j, TokensDataConfig(), require_tags=False)
    assert s[1].spans == [(0, 3), (5, 14), (15, 19)] and s[1].text == "Mr.  Knightley came!"
    assert s[2].tokens == ["Miss", "Bates", "(", "of", "Highbury", ")", "talked", "."] and s[2].tags is None
    assert [s[2].text[a:b] for a, b in s[2].spans] == s[2].tokens
    with pytest.raises(KilnError, match=r"a\.jsonl:3: no field 'tags'"):
        read_sentences(j, TokensDataConfig())
    j.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}))
    with pytest.raises(KilnError, match="must be a list of 2 tag string"):
        read_sentences(j, TokensDataConfig())
    j.write_text(json.dumps({"tokens": ["Emma", "Jane"], "tags": ["O", "O"], "text": "Jane and Emma"}))
    with pytest.raises(KilnError, match="token 'Jane' does not occur in the text after character 13"):
        read_sentences(j, TokensDataConfig())
    assert words_of("Dr. Watson, hi!") == [(0, 3), (4, 10), (10, 11), (12, 14), (14, 15)]  # Dr. keeps its period


def test_schemes_are_detected_and_checked():
    assert detect_scheme([["B-PER", "I-PER", "O", "B-LOC"]]) == "IOB2"
    assert detect_scheme([["I-PER", "I-PER", "O", "B-PER"]]) == "IOB1"  # an entity starting with I-
    assert detect_scheme([["S-PER", "O", "B-LOC", "E-LOC"]]) == "BIOES"
    assert detect_scheme([["NNP", "VBD", "."]]) == "none" and detect_scheme([["O", "O"]]) == "none"
    from kiln.data.conll import Sentence

    with pytest.raises(KilnError, match=r"x\.conll:4: tag 'S-PER' is not an IOB2 tag"):
        check_tags([Sentence(["Emma"], ["S-PER"], 4)], "IOB2", "x.conll")
    assert entities(["B-PER", "I-PER", "O", "B-LOC"], "IOB2") == [("PER", 0, 2), ("LOC", 3, 4)]
    assert entities(["I-PER", "I-PER", "B-PER"], "IOB1") == [("PER", 0, 2), ("PER", 2, 3)]
    assert entities(["S-PER", "B-LOC", "I-LOC", "E-LOC"], "BIOES") == [("PER", 0, 1), ("LOC", 1, 4)]
    assert entities(["O", "I-PER", "O"], "IOB2") == []  # strict: an I- without its B- is no entity


def test_entity_f1_matches_a_hand_computation():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O"],   # Jane Bennet visited London .
            ["B-PER", "O", "B-LOC", "I-LOC", "O"]]   # Emma saw Box Hill .
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O"],   # PER right; LOC missed; ORG spurious
            ["B-PER", "O", "B-LOC", "O", "O"]]       # PER right; LOC with the wrong span: one FP, one FN
    # gold entities 4 (PER 2, LOC 2), predicted 4 (PER 2, ORG 1, LOC 1), correct 2 (the PERs)
    m = token_metrics(gold, pred, "IOB2")
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 4, 2 / 4, 0.5))
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert m["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["per_type"]["ORG"]["support"] == 0 and m["macro_f1"] == pytest.approx(1 / 3)  # (1 + 0 + 0) / 3
    assert m["accuracy"] == pytest.approx(8 / 10) and m["entities"] == 4
    pos = token_metrics([["NNP", "VBD", "NNP"]], [["NNP", "NNP", "NNP"]], "none")  # plain tags: per-tag F1
    # NNP: P 2/3 R 1 F1 .8; VBD: P 0 R 0 F1 0 -> macro .4
    assert pos["accuracy"] == pytest.approx(2 / 3) and pos["f1"] == pytest.approx(0.4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return root, make_backbone(root / "bb", NER.read_text(), context_length=64, vocab_size=2000)


def test_labels_sit_on_the_first_sub_token_of_each_word(tiny):
    from kiln.data.conll import Sentence
    from kiln.data.tokenizer import load_tokenizer

    _, backbone = tiny
    tok = load_tokenizer(backbone / "tokenizer.json")
    s = Sentence(["Knightleyish", "walked", "to", "Highburyshire", "."], ["B-PER", "O", "O", "B-LOC", "O"], 1)
    index = {"O": 0, "B-LOC": 1, "B-PER": 2}
    w = encode_words(tok, [s], index, 64, 10**6, 2, "t")
    enc = tok.encode(s.tokens, is_pretokenized=True)
    assert len(enc.ids) > len(s.tokens) + 2  # some words are several sub-tokens
    first = [p for p, wid in enumerate(enc.word_ids) if wid is not None and (p == 0 or enc.word_ids[p - 1] != wid)]
    want = [IGNORE_INDEX] * len(enc.ids)
    for p in first:
        want[p] = index[s.tags[enc.word_ids[p]]]
    assert w.labels[0] == want and w.labels[0][0] == w.labels[0][-1] == IGNORE_INDEX  # [CLS], [SEP]
    assert [int(x) for x in w.words[0][w.words[0] >= 0]] == [0, 1, 2, 3, 4]
    short = encode_words(tok, [s], index, 6, 10**6, 2, "t")  # cut: the last words are never seen
    assert short.truncated == 1 and len(short.ids[0]) == 6


def test_missing_tag_column_through_the_cli_is_one_line_and_writes_nothing(tiny, tmp_path, capsys):
    _, backbone = tiny
    bad = tmp_path / "bad.conll"
    bad.write_text("Emma Xx B-PER\nwalked x O\n\nto x O\nHighbury Xx\n. p O\n")
    err = assert_user_error(capsys, ["finetune", "tokens", "--data.train", bad, "--init", backbone, "--out",
                                     tmp_path / "run"], f"{bad}:5:", "missing tag column")
    assert "2 column(s), the file has 3" in err and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def trained(tiny):
    root, backbone = tiny
    data, run = NER, root / "run"
    assert main(["finetune", "tokens", "--data.train", str(data), "--init", str(backbone), "--out", str(run),
                 "--data.max_length", "64", "--epochs", "4", "--train.lr", "3e-3", *FAST]) == 0
    return root, run, data


def test_finetune_tokens_learns_the_entities(trained, capsys, tmp_path):
    root, run, data = trained
    for f in ("tokens.yaml", "run.json", "tokenizer.json", "data.json", "eval/test.json", "eval/val.json",
              "eval/test_predictions.jsonl", "eval/summary.json", "checkpoints/best"):
        assert (run / f).exists(), f
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "tokens" and info["scheme"] == "IOB2"
    assert info["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    m = json.loads((run / "eval/test.json").read_text())
    assert m["f1"] > 0.7 and m["accuracy"] > 0.97 and set(m["per_type"]) >= {"PER"}, m

    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"text": "Elizabeth  and Mr. Darcy walked to Pemberley."}) + "\n")
    assert main(["predict", str(run), str(new), "--out", str(tmp_path / "p.jsonl")]) == 0
    [p] = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert p["tokens"][-1] == "." and len(p["tags"]) == len(p["tokens"])
    for e in p["entities"]:  # character spans in the original text
        assert p["text"][e["start"]:e["end"]] == e["text"] and e["type"] in ("PER", "LOC")
    assert "Elizabeth" in [e["text"] for e in p["entities"]]

    assert main(["eval", str(run), str(data), "--out", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "micro avg" in out and "token accuracy" in out
    ev = json.loads((tmp_path / "e.json").read_text())
    preds = [json.loads(x) for x in (tmp_path / "e_predictions.jsonl").read_text().splitlines()]
    gold = read_sentences(data, TokensDataConfig())
    again = token_metrics([s.tags for s in gold], [p["tags"] for p in preds], "IOB2")
    assert ev["f1"] == pytest.approx(again["f1"]) and ev["sentences"] == len(gold)
    bad = tmp_path / "bad.conll"
    bad.write_text("Emma Xx B-MISC\n")
    assert_user_error(capsys, ["eval", run, bad], "bad.conll:1", "'B-MISC' is not a label of this run")


def test_training_batches_are_a_pure_function_of_the_index(trained):
    from kiln.data.tokenizer import load_tokenizer
    from kiln.tasks.tokens import WordBatches

    _, run, data = trained
    sents = read_sentences(data, TokensDataConfig())
    w = encode_words(load_tokenizer(run / "tokenizer.json"), sents, {"O": 0}, 64, 10**6, 2, "t")
    a, b = WordBatches(w, 8, 5, 0), WordBatches(w, 8, 5, 0)
    xs = [a.batch(i) for i in (300, 1, 4)]
    for i, x in zip((300, 1, 4), xs):
        assert all(torch.equal(x[k], b.batch(i)[k]) for k in x)


def test_hf_bert_for_token_classification_import_export_parity(trained, tmp_path):
    import transformers
    import kiln

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64, type_vocab_size=2, vocab_size=99, pad_token_id=0,
                                  id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)})
    torch.manual_seed(0)
    ref = transformers.BertForTokenClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    model, _, _, info = kiln.load(tmp_path / "run")
    assert info["kind"] == "tokens" and info["labels"] == labels and info["scheme"] == "IOB2"
    ids = torch.randint(3, 99, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    m = mask.bool()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, token_type_ids=types).logits
        assert (model(ids, attention_mask=mask, token_type_ids=types) - want).abs()[m].max() <= TOL
        assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
        back = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out").eval()
        assert back.config.id2label == dict(enumerate(labels))
        assert (back(ids, attention_mask=mask, token_type_ids=types).logits - want).abs()[m].max() <= TOL

        _, run, _ = trained  # a fine-tuned run: its best checkpoint, through transformers
        assert main(["export", "hf", str(run), str(tmp_path / "out2")]) == 0
        mine, _, _, meta = kiln.load(run, "best")
        hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out2").eval()
        assert [hf.config.id2label[i] for i in range(len(meta["labels"]))] == meta["labels"]
        z = mine(ids, attention_mask=mask, token_type_ids=types)
        assert (z - hf(ids, attention_mask=mask, token_type_ids=types).logits).abs()[m].max() <= TOL
