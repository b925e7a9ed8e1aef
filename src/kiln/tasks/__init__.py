"""Fine-tuning tasks on one driver (kiln.tasks.driver), and the registry every verb dispatches through.

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
    "chat": ("kiln.tasks.chat", "instruction-tune a decoder on conversations (messages, prompt-completion, Alpaca)"),
    "audio": ("kiln.tasks.audio", "audio classification (keyword spotting, speakers) with a Wav2Vec 2.0 encoder"),
    "asr": ("kiln.tasks.asr", "speech recognition: CTC over characters on a Wav2Vec 2.0 encoder (WER, CER)"),
}
# kind -> "module:Class" of its config (TASK.config_cls), so the CLI reads a recipe and its overrides before it
# imports the task: a mistake in them is one line in ~0.2-0.5 s, not after ~3-5 s of importing torch (each of these
# modules imports no torch; tests/cli/test_cli.py checks it).
CONFIGS = {"classify": "kiln.config:ClassifyConfig", "seq2seq": "kiln.config:Seq2SeqConfig",
           "qa": "kiln.data.squad:QAConfig", "tokens": "kiln.data.conll:TokensConfig",
           "image": "kiln.data.images:ImageConfig", "chat": "kiln.data.chat_data:ChatConfig",
           "audio": "kiln.data.audio_config:AudioConfig", "asr": "kiln.data.audio_config:ASRConfig"}


# every kind of run the one driver trains: pretraining (`kiln pretrain`, `kiln distill`) and the fine-tuning tasks
KINDS = {"pretrain": "kiln.tasks.lm", **{kind: module for kind, (module, _) in REGISTRY.items()}}


def get(kind: str):
    if kind not in KINDS:
        raise KilnError(f"unknown task {kind!r}{did_you_mean(kind, REGISTRY)}; tasks: {', '.join(REGISTRY)}")
    return importlib.import_module(KINDS[kind]).TASK


def config_class(kind: str) -> type:
    """The config class of a task (the same class as get(kind).config_cls), without importing the task."""
    if kind not in CONFIGS:
        get(kind)  # the one-line error for an unknown task
    module, name = CONFIGS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def for_run(run_dir):
    """The task that made a run folder (by run.json's kind, or the config file of an older folder)."""
    from kiln.run.folder import run_kind

    return get(run_kind(run_dir))
