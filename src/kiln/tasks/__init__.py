"""Fine-tuning tasks on one driver (kiln.tasks.finetune), and the registry every verb dispatches through.

`get(kind)` returns the task for a run kind (run.json's "kind"); `for_run(run_dir)` the task of a run folder.
Tasks are imported on first use: `import kiln` stays light.
"""

from __future__ import annotations

import importlib

from kiln.errors import KilnError, did_you_mean

# kind -> (module holding TASK, a kiln.tasks.base.Task; one line for `kiln finetune --help`)
REGISTRY = {
    "classify": ("kiln.tasks.classify", "text classification from a CSV/TSV/JSONL file"),
    "seq2seq": ("kiln.tasks.seq2seq", "train an encoder-decoder on source/target pairs (translate, summarize)"),
    "qa": ("kiln.tasks.qa", "extractive question answering from SQuAD v1.1/v2.0 JSON or JSONL"),
    "tokens": ("kiln.tasks.tokens", "token classification (NER, POS) from CoNLL column files or JSONL"),
    "image": ("kiln.tasks.images", "image classification with a Vision Transformer (image folders, IDX, CSV)"),
}


def get(kind: str):
    if kind not in REGISTRY:
        raise KilnError(f"unknown task {kind!r}{did_you_mean(kind, REGISTRY)}; tasks: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[kind][0]).TASK


def for_run(run_dir):
    """The task that made a run folder (by run.json's kind, or the config file of an older folder)."""
    from kiln.run.folder import run_kind

    return get(run_kind(run_dir))
