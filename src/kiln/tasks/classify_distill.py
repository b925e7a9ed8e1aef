"""Distillation for classifiers: teachers (fine-tuned kiln classifiers, one or an ensemble) label the
training texts once before training, each through its own tokenizer; `distill.augment` adds teacher-labelled
augmented copies (kiln.data.augment; Tang et al. 2019) that the student learns from the teachers alone."""

from __future__ import annotations

import time

import numpy as np

from kiln.data import tables
from kiln.tasks.text_inputs import encode_examples, predict_logits, prepare_tokenizer
from kiln.train.mlm import special_ids


def augmented_examples(rows: list, copies: int, seed: int, tokenizers: list) -> list:
    """`copies` augmented versions of each training example (kiln.data.augment), the label carried along
    only as a placeholder. A masked word becomes the mask token every tokenizer knows, or is dropped."""
    from kiln.data.augment import augment_texts

    masks = [special_ids(t.get_vocab(with_added_tokens=True))[0] for t in tokenizers]
    names = {t.id_to_token(m) if m is not None else None for t, m in zip(tokenizers, masks)}
    mask = names.pop() if len(names) == 1 else None
    return [tables.Example(text=text, label=rows[i].label, pair=rows[i].pair)
            for i, text in augment_texts([r.text for r in rows], copies, seed, mask)]


def teacher_logits(teachers: list, examples: list, labels: list[str], device: str) -> np.ndarray:
    """[n_teachers, n, n_classes]: each teacher's class logits for the examples, each through its own tokenizer
    and max_length (teachers need not share the student's tokenizer)."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for model, tok, t_cfg in teachers:
        enc = encode_examples(prepare_tokenizer(tok, t_cfg.data.max_length), examples, index, t_cfg.model, "teacher")
        pad = t_cfg.model.pad_id
        out.append(predict_logits(model, enc, 64, pad, device))
    return np.stack(out)


def attach_teachers(cfg, teachers: list, enc: dict, splits: dict, labels: list[str], student_tok, index: dict,
                    device: str, log) -> None:
    """Teacher logits (and augmented copies, distill.augment) into the training encoding, in place."""
    t0 = time.perf_counter()
    rows = splits["train"]
    if cfg.distill.augment:
        extra = augmented_examples(rows, cfg.distill.augment, cfg.seed, [student_tok] + [t[1] for t in teachers])
        n = len(enc["train"])
        tok = prepare_tokenizer(student_tok, cfg.data.max_length)
        enc["train"] = enc["train"] + encode_examples(tok, extra, index, cfg.model, "augmented")
        enc["train"].hard = np.r_[np.ones(n), np.zeros(len(extra))]
        rows = rows + extra
        log(f"augmentation: {len(extra)} augmented copies of the {n} training texts "
            f"({cfg.distill.augment} each), labelled by the teachers alone")
    enc["train"].teacher_logits = teacher_logits(teachers, rows, labels, device)
    log(f"teacher logits for {len(enc['train'])} training examples in {time.perf_counter() - t0:.1f}s")
