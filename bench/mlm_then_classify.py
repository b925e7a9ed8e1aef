"""A BERT-style encoder pretrained from scratch by kiln (masked LM), then fine-tuned on rotten_tomatoes.

The whole user path through the CLI, one step after the other:

    kiln pretrain configs/bert-mlm.yaml --data.source CORPUS ...      # MLM on the books (no reviews)
    kiln finetune classify configs/classify-rotten.yaml --init RUN ... # same split as the MiniLM benchmark

CORPUS is a folder of .txt files; by default the embedded corpora of ../shared/data: tiny Shakespeare, Jane
Austen's novels and the English side of the Bible pairs (~9 MB). Reference points (data/README.md): majority
class 57.3%, TF-IDF + logistic regression 79.4%.

    python bench/mlm_then_classify.py --shared /work/shared/data --steps 1500
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def corpus_folder(shared: Path, out: Path, books: list[str], reviews: bool, copies: int = 1) -> Path:
    folder = out / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    for name in books:
        if name == "bible":
            lines = (shared / "bible_en_es.tsv").read_text(encoding="utf-8").splitlines()[1:]
            (folder / "bible_en.txt").write_text("\n".join(line.split("\t")[1] for line in lines) + "\n",
                                                 encoding="utf-8")
        else:
            (folder / f"{name}.txt").write_bytes((shared / f"{name}.txt").read_bytes())
    if reviews:  # the *training split* of the classification task, labels dropped: no val/test text is seen
        from kiln.config import ClassifyConfig, load_config
        from kiln.train.classify import load_splits

        cfg = load_config(ROOT / "configs" / "classify-rotten.yaml", ["--data.train", str(shared / "rotten_tomatoes.csv"),
                                                                       "--seed", "0"], cls=ClassifyConfig)
        splits, _, _ = load_splits(cfg, lambda s: None)
        text = "\n".join(e.text for e in splits["train"]) + "\n"
        for i in range(copies):  # oversampling: identical copies hash alike, so no piece is both train and val
            (folder / f"reviews_train_{i}.txt").write_text(text, encoding="utf-8")
    return folder


def kiln(*args: str) -> None:
    cmd = [sys.executable, "-m", "kiln", *args]
    print("$ kiln " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=1500, help="MLM optimizer steps")
    ap.add_argument("--epochs", type=float, default=4.0, help="fine-tuning epochs")
    ap.add_argument("--lr", type=float, default=2e-4, help="fine-tuning peak lr")
    ap.add_argument("--books", default="tinyshakespeare,austen,bible", help="comma list of tinyshakespeare, "
                    "austen, bible")
    ap.add_argument("--with-reviews", action="store_true", help="add the review task's training split (texts only)")
    ap.add_argument("--reviews-copies", type=int, default=1, help="with --with-reviews: copies of that text "
                    "(oversamples the in-domain text against the books)")
    ap.add_argument("--mlm-args", default="", help="further overrides of the MLM run, e.g. '--train.optimizer muon'")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or ROOT / "runs" / f"mlm-then-classify-{time.strftime('%Y%m%d-%H%M%S')}"
    corpus = corpus_folder(a.shared, out, [b for b in a.books.split(",") if b], a.with_reviews, a.reviews_copies)
    t0 = time.perf_counter()
    kiln("pretrain", "configs/bert-mlm.yaml", "--out", str(out / "mlm"), "--data.source", str(corpus),
         "--data.vocab_size", "8192", "--model.n_layer", "4", "--model.d_model", "256", "--model.n_head", "4",
         "--train.batch_size", "64", "--train.max_steps", str(a.steps), "--train.warmup_steps", "200",
         "--train.eval_every", str(max(a.steps // 5, 1)), "--train.save_every", str(a.steps),
         "--train.tensorboard", "false", *shlex.split(a.mlm_args))
    pretrain_min = (time.perf_counter() - t0) / 60
    t1 = time.perf_counter()
    kiln("finetune", "classify", "configs/classify-rotten.yaml", "--init", str(out / "mlm"),
         "--out", str(out / "classify"), "--data.train", str(a.shared / "rotten_tomatoes.csv"), "--seed", "0",
         "--epochs", str(a.epochs), "--train.lr", str(a.lr), "--train.tensorboard", "false")
    finetune_min = (time.perf_counter() - t1) / 60
    s = json.loads((out / "classify" / "eval" / "summary.json").read_text())
    with open(out / "mlm" / "metrics.csv", newline="") as f:
        mlm = [{k: v for k, v in row.items() if v} for row in csv.DictReader(f) if row.get("val_loss")]
    result = {"machine": machine(), "mlm_steps": a.steps, "pretrain_minutes": round(pretrain_min, 2),
              "finetune_minutes": round(finetune_min, 2), "last_mlm_eval": mlm[-1] if mlm else None,
              "test_accuracy": s["test"]["accuracy"], "test_macro_f1": s["test"]["macro_f1"],
              "val_accuracy": s["val"]["accuracy"], "run_dir": str(out)}
    emit_json(result, a.json)


if __name__ == "__main__":
    main()
