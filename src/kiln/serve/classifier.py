"""The classifier backend of `kiln serve`: a classifier run (kiln finetune classify) answering /v1/classify
with the probabilities `kiln predict` computes."""

from __future__ import annotations

import threading
from pathlib import Path

from kiln.errors import KilnError
from kiln.serve.jobs import Job


def load_classifier_backend(run_dir: Path, which: str, device: str):
    """Everything `kiln serve` needs of a classifier run: (label names, whether it reads text pairs,
    predict(texts, pairs) -> class probabilities [n, n_classes] as `kiln predict` computes them, a model
    description). The only place kiln.serve touches the classification task's internals."""
    from kiln.data import tables
    from kiln.run.device import resolve_device
    from kiln.tasks.base import eval_batch_size
    from kiln.tasks.classify_files import load_classifier
    from kiln.tasks.text_inputs import encode_examples, predict_probs, prepare_tokenizer

    device = resolve_device(device, what="--device")
    model, tokenizer, cfg, labels = load_classifier(run_dir, which, device=device)
    problem = getattr(cfg, "problem", "single_label")
    if problem != "single_label":  # /v1/classify answers one label with class probabilities (a softmax)
        raise KilnError(f"{run_dir} is a {problem} classifier; kiln serve answers single-label classifiers: use "
                        f"kiln predict {run_dir} FILE for its {'labels' if problem == 'multi_label' else 'numbers'}")
    tok = prepare_tokenizer(tokenizer, cfg.data.max_length)
    pad = cfg.model.pad_id
    batch_size = eval_batch_size(cfg)  # as kiln predict

    def predict(texts: list[str], pairs: list[str] | None = None):
        rows = [tables.Example(t, None, pairs[i] if pairs is not None else None) for i, t in enumerate(texts)]
        enc = encode_examples(tok, rows, None, cfg.model, "request")
        return predict_probs(model, enc, batch_size, pad, device)

    info = {"kind": "classifier", "labels": labels, "max_length": cfg.data.max_length, "device": device,
            "text_pair": bool(cfg.data.text_pair_field),
            "parameters": sum(p.numel() for p in model.parameters())}
    return labels, bool(cfg.data.text_pair_field), predict, info


class ClassifierBackend:
    kind = "classify"
    context_length = 0

    def __init__(self, run_dir: Path, which: str = "best", device: str = "auto"):
        self.labels, self.pairs, self._predict, self.info = load_classifier_backend(run_dir, which, device)

    def warm_up(self) -> None:
        self._predict(["warm up"], ["warm up"] if self.pairs else None)

    def run(self, jobs: list[Job], stopping: threading.Event) -> None:
        """All texts of all jobs in one call (the task batches them by length), then split back per job."""
        texts = [t for j in jobs for t in j.texts]
        pairs = [p for j in jobs for p in j.pairs] if self.pairs else None
        try:
            probs = self._predict(texts, pairs)
        except KilnError as e:
            for j in jobs:
                j.on_error(e)
            return
        at = 0
        for j in jobs:
            part = probs[at:at + len(j.texts)]
            at += len(j.texts)
            j.on_done({"probs": part.tolist()})
