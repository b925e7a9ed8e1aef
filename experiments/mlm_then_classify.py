"""Feeds docs/benchmarks.md, section 'A BERT-style encoder pretrained from scratch, then fine-tuned'.

Its table of what moved the fine-tuned accuracy comes from this script.

A BERT-style encoder pretrained from scratch by kiln (masked LM), then fine-tuned on rotten_tomatoes.

The whole user path through the CLI, one step after the other:

    kiln pretrain configs/bert-mlm.yaml --data.source CORPUS ...      # MLM on the books (no reviews)
    kiln finetune classify configs/classify-rotten.yaml --init RUN ... # same split as the MiniLM benchmark

CORPUS is a folder of .txt files; by default the embedded corpora of ../shared/data: tiny Shakespeare, Jane
Austen's novels and the English side of the Bible pairs (~9 MB). Reference points (data/README.md): majority
class 57.3%, TF-IDF + logistic regression 79.4%.

    python experiments/mlm_then_classify.py --shared /work/shared/data --steps 1500

--tapt-steps N adds task-adaptive pretraining (Gururangan et al. 2020) between the two: N more MLM steps on the
review task's training texts alone (labels dropped), from the encoder and with its tokenizer. --encoder RUN
skips the first pretraining and starts from an existing MLM run; --seeds 0,1,2 fine-tunes once per seed and
reports each and their mean (one test accuracy moves by about a point with the seed alone).

    python experiments/mlm_then_classify.py --encoder runs/.../mlm --tapt-steps 1500 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py: machine facts, JSON
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
        from kiln.tasks.classify import load_splits

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
    ap.add_argument("--mlm-args", default="", help="further overrides of the MLM run, e.g. '--objective electra'")
    ap.add_argument("--encoder", type=Path, default=None, help="an existing MLM run: skip the first pretraining")
    ap.add_argument("--tapt-steps", type=int, default=0, help="task-adaptive MLM steps on the review texts alone")
    ap.add_argument("--tapt-lr", type=float, default=3e-4)
    ap.add_argument("--tapt-args", default="", help="further overrides of the TAPT run, e.g. '--mlm.mask_prob 0.3'")
    ap.add_argument("--seeds", default="0", help="fine-tuning seeds, comma-separated")
    ap.add_argument("--ft-args", default="", help="further overrides of the fine-tuning, e.g. "
                    "'--train.layer_lr_decay 0.8'")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or ROOT / "runs" / f"mlm-then-classify-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    encoder = a.encoder
    if encoder is None:
        corpus = corpus_folder(a.shared, out, [b for b in a.books.split(",") if b], a.with_reviews, a.reviews_copies)
        encoder = out / "mlm"
        kiln("pretrain", "configs/bert-mlm.yaml", "--out", str(encoder), "--data.source", str(corpus),
             "--data.vocab_size", "8192", "--model.n_layer", "4", "--model.d_model", "256", "--model.n_head", "4",
             "--train.batch_size", "64", "--train.max_steps", str(a.steps), "--train.warmup_steps", "200",
             "--train.eval_every", str(max(a.steps // 5, 1)), "--train.save_every", str(a.steps),
             "--train.tensorboard", "false", *shlex.split(a.mlm_args))
    pretrain_min = (time.perf_counter() - t0) / 60
    if a.tapt_steps:
        t1 = time.perf_counter()
        tapt_corpus = corpus_folder(a.shared, out / "tapt", [], True)
        kiln("pretrain", str(encoder / "config.yaml"), "--init", str(encoder), "--out", str(out / "tapt_mlm"),
             "--data.source", str(tapt_corpus), "--data.tokenizer", str(encoder / "tokenizer.json"),
             "--data.prepared", "", "--data.lowercase", "false", "--train.max_steps", str(a.tapt_steps), "--train.lr", str(a.tapt_lr),
             "--train.min_lr", str(a.tapt_lr / 10), "--train.warmup_steps", "100",
             "--train.eval_every", str(max(a.tapt_steps // 5, 1)), "--train.save_every", str(a.tapt_steps),
             "--train.tensorboard", "false", *shlex.split(a.tapt_args))
        encoder = out / "tapt_mlm"
        pretrain_min += (time.perf_counter() - t1) / 60
    runs = []
    for seed in [int(x) for x in a.seeds.split(",")]:
        t1 = time.perf_counter()
        clf = out / f"classify_seed{seed}"
        kiln("finetune", "classify", "configs/classify-rotten.yaml", "--init", str(encoder), "--out", str(clf),
             "--data.train", str(a.shared / "rotten_tomatoes.csv"), "--seed", str(seed), "--epochs", str(a.epochs),
             "--train.lr", str(a.lr), "--train.tensorboard", "false", *shlex.split(a.ft_args))
        s = json.loads((clf / "eval" / "summary.json").read_text())
        runs.append({"seed": seed, "finetune_minutes": round((time.perf_counter() - t1) / 60, 2),
                     "test_accuracy": s["test"]["accuracy"], "test_macro_f1": s["test"]["macro_f1"],
                     "val_accuracy": s["val"]["accuracy"]})
    with open(encoder / "metrics.csv", newline="") as f:
        mlm = [{k: v for k, v in row.items() if v} for row in csv.DictReader(f) if row.get("val_loss")]
    mean = {k: round(statistics.mean(r[k] for r in runs), 4) for k in ("test_accuracy", "test_macro_f1", "val_accuracy")}
    result = {"machine": machine(), "encoder": str(encoder), "mlm_steps": a.steps if a.encoder is None else None,
              "tapt_steps": a.tapt_steps, "tapt_args": a.tapt_args, "pretrain_minutes": round(pretrain_min, 2), "last_mlm_eval": mlm[-1] if mlm else None,
              "finetunes": runs, "mean": mean, "run_dir": str(out)}
    emit_json(result, a.json)


if __name__ == "__main__":
    main()
