"""Instruction data for `kiln finetune chat`: conversations read from JSONL in the three layouts people have,
rendered with the run's chat template, tokenized with a mask of the tokens the loss sees, and packed.

    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}]}   OpenAI / TRL
    {"prompt": "...", "completion": "..."}                                                       prompt-completion
    {"instruction": "...", "input": "...", "output": "..."}                                      Alpaca

Which tokens are the assistant's is found by rendering: the template's text for the conversation up to an
assistant turn with the generation prompt, then with that turn; the characters between are the reply (its
end-of-turn marker included, so the model learns to stop). The whole text is tokenized once with offsets, and a
token is a target when it lies inside a reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.config import EpochTrainConfig, _f
from kiln.data.chat import ROLES, ChatTemplate, check_messages
from kiln.data.columns import json_object
from kiln.errors import KilnError
from kiln.model.config import ModelConfig

CONFIG_FILE = "chat.yaml"  # the config file of a `kiln finetune chat` run (kiln.tasks.chat)
LAYOUTS = ("auto", "messages", "prompt_completion", "alpaca")


@dataclass
class ChatDataConfig:
    train: str = _f("", "training conversations: .jsonl with messages (OpenAI: system/user/assistant), prompt + "
                    "completion, or instruction + input + output (Alpaca)")
    val: str = _f("", "validation conversations; empty = split off from train (seeded)")
    test: str = _f("", "test conversations; empty = split off from train")
    layout: str = _f("auto", "auto (from each row's fields) | messages | prompt_completion | alpaca", choices=LAYOUTS)
    max_length: int = _f(1024, "tokens per conversation (and per packed sequence); a longer conversation is cut "
                         "there and counted", range=">= 8")
    val_fraction: float = _f(0.05, "share of the conversations held out for validation when data.val is empty",
                             range="[0, 1)")
    test_fraction: float = _f(0.0, "share held out for test when data.test is empty", range="[0, 1)")
    dedup: bool = _f(True, "drop exact duplicate conversations")
    encoding: str = _f("utf-8", "text encoding of the input files")


@dataclass
class ChatTrainConfig(EpochTrainConfig):
    benchmarks: str = _f("", "benchmark files scored at each evaluation, comma-separated (JSONL: multiple choice "
                         "or question/answer, as kiln eval reads them; each question a user turn of the chat "
                         "template): val_<file>_acc, _acc_norm or _exact_match in metrics.csv, plots/benchmarks.png")


def _chat_train() -> ChatTrainConfig:
    return ChatTrainConfig(max_steps=0, batch_size=8, lr=2e-5, min_lr=0.0, warmup_steps=0, decay="linear",
                            weight_decay=0.0, beta2=0.999, eval_every=0, save_every=0, keep_last=1, log_every=5)


@dataclass
class ChatConfig:
    """`kiln finetune chat`: a decoder (an imported open model, or a kiln run) tuned on conversations."""

    name: str = _f("chat", "run name; the run folder is runs/<name>-<timestamp> unless --out names it")
    out: str = _f("", "run folder (default runs/<name>-<timestamp>)")
    seed: int = _f(1337, "random seed for the split, data order, packing and dropout", range=">= 0")
    init: str = _f("", "the model to tune: a kiln decoder run (kiln import gguf / import hf) or a Hugging Face "
                   "folder (imported into <run>/base); its tokenizer and chat template (ChatML without one) are used")
    init_checkpoint: str = _f("latest", "checkpoint of a kiln run used as init: latest | best | a folder")
    assistant_only: bool = _f(True, "the loss sees the assistant's tokens only (their end-of-turn marker "
                              "included); false = every token of the conversation")
    packing: bool = _f(True, "several conversations per sequence of data.max_length tokens, each attending only "
                       "to itself with positions restarting (a block-diagonal mask): no padding computed")
    epochs: float = _f(1.0, "passes over the training conversations (sets train.max_steps when that is 0)",
                       range="> 0")
    warmup_fraction: float = _f(0.03, "share of the steps for linear warmup when train.warmup_steps is 0",
                                range="[0, 1)")
    samples: int = _f(2, "validation prompts answered greedily at each evaluation (logged and written to "
                      "eval/samples.jsonl)", range=">= 0")
    sample_tokens: int = _f(64, "longest sample reply in tokens", range=">= 1")
    patience: int = _f(0, "stop after this many evaluations without a lower val loss; 0 = never", range=">= 0")
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    train: ChatTrainConfig = field(default_factory=_chat_train)
    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata={"help": "written by kiln: the model's shape (read from init)"})


def to_messages(row: dict, layout: str, where: str) -> list[dict]:
    """One JSONL row as a conversation."""
    if layout == "auto":
        layout = ("messages" if "messages" in row else "prompt_completion" if "prompt" in row and "completion" in row
                  else "alpaca" if "instruction" in row and "output" in row else "")
        if not layout:
            raise KilnError(f"{where}: expected messages, prompt + completion, or instruction + output (Alpaca); "
                            f"got the fields {', '.join(sorted(row)) or 'none'}")
    try:
        if layout == "messages":
            messages = row["messages"]
        elif layout == "prompt_completion":
            messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        else:
            extra = row.get("input") or ""
            text = row["instruction"] + (f"\n\n{extra}" if extra else "")
            messages = [{"role": "user", "content": text}, {"role": "assistant", "content": row["output"]}]
    except KeyError as e:
        raise KilnError(f"{where}: data.layout {layout} needs the field {e.args[0]!r}") from None
    try:
        check_messages(messages)
    except KilnError as e:
        raise KilnError(f"{where}: {e}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise KilnError(f"{where}: the conversation has no assistant turn: nothing to learn from it")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | Path, layout: str = "auto", encoding: str = "utf-8") -> list[list[dict]]:
    """The conversations of a JSONL file, one per non-empty line (a bad line is one KilnError naming it)."""
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"file not found: {path}")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise KilnError(f"{path}: conversations are read from .jsonl (one JSON object per line)")
    try:
        lines = path.read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as e:
        raise KilnError(f"{path}: not {encoding} text ({e.reason} at byte {e.start})") from None
    out = [to_messages(json_object(path, i, line), layout, f"{path}:{i}")
           for i, line in enumerate(lines, 1) if line.strip()]
    if not out:
        raise KilnError(f"{path}: no conversations")
    return out


def reply_spans(template: ChatTemplate, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, character spans of its assistant replies)."""
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True) if i else ""
        upto = template.render(messages[:i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise KilnError(f"{template.where}: rendering a conversation turn by turn does not give prefixes of the "
                            "whole (the template rewrites earlier turns); train with data.assistant_only false")
        spans.append((len(before), len(upto)))
    return text, spans


@dataclass
class EncodedChat:
    ids: np.ndarray      # int64 token ids of the rendered conversation
    targets: np.ndarray  # bool: the token is predicted by the loss (an assistant token, or every token)


def encode(tokenizer, template: ChatTemplate, messages: list[dict], assistant_only: bool = True) -> EncodedChat:
    text, spans = reply_spans(template, messages)
    enc = tokenizer.encode(text, add_special_tokens=False)  # the template writes the special tokens
    ids = np.asarray(enc.ids, dtype=np.int64)
    if not assistant_only:
        return EncodedChat(ids, np.ones(len(ids), dtype=bool))
    starts = np.asarray([s for s, _ in enc.offsets]) if enc.offsets else np.zeros(0, dtype=np.int64)
    targets = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        targets |= (starts >= a) & (starts < b)
    return EncodedChat(ids, targets)


def last_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    """(the conversation up to its last assistant turn, that turn's text): what a sample reply answers."""
    i = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:i], messages[i]["content"]


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into sequences of at most `capacity` tokens: first-fit decreasing (longest first, each into
    the first sequence with room), deterministic; every sequence keeps its conversations whole."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def roles_seen(conversations: list[list[dict]]) -> dict[str, int]:
    counts = dict.fromkeys(ROLES, 0)
    for conv in conversations:
        for m in conv:
            counts[m["role"]] += 1
    return {r: n for r, n in counts.items() if n}
