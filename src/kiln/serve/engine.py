"""The model side of `kiln serve`: a bounded queue of requests and one worker thread that batches them.

No web framework here (kiln.serve.app is the HTTP face). The worker takes the oldest waiting request and
every other waiting one it can run in the same forward passes (up to --max-batch), runs them together, and
starts again: static batching of the requests that arrive while a batch runs. Requests beyond --queue waiting
are refused at once (QueueFull -> HTTP 503), so memory stays bounded under any load.

Language-model runs decode with the model's own `generate` (kiln.model.generate) exactly as `kiln.api.sample`
calls it: the same prompt encoding, the same stop-string test on the decoded new tokens, the same cut of the
text before the first stop string. Several prompts run as one left-padded batch (an attention mask and
position ids per row), which gives each row the tokens it gets alone: at temperature 0 a served completion
is `kiln generate`'s greedy output. Requests that cannot share a batch without changing their result run
alone: a seeded request (one generator per batch), and one whose prompt + max_tokens pass the context window
(generate then slides a window over the last context_length tokens, padding included).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kiln.errors import KilnError


class QueueFull(Exception):
    """More requests are waiting than --queue allows."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


# ----------------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One prompt (or one list of texts to classify) waiting for, or running on, the model.

    The worker calls on_delta(text) as text becomes final (streaming) and on_done(result) or on_error(exc)
    once at the end; both are called from the worker thread."""

    kind: str                                  # "complete" | "classify"
    on_done: Callable[[dict], None]
    on_error: Callable[[BaseException], None]
    on_delta: Callable[[str], None] | None = None
    # completion
    ids: list[int] = field(default_factory=list)
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # classification
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    cancelled: bool = False
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self, ctx: int):
        """Jobs with equal keys may share forward passes; None: this job runs alone."""
        if self.kind == "classify":
            return "classify"
        if self.seed is not None or len(self.ids) + self.max_tokens > ctx:
            return None
        return ("greedy",) if self.greedy else ("sample", self.temperature, self.top_p, self.top_k)


class JobQueue:
    """FIFO of waiting jobs with a hard bound; take() hands the worker the next batch."""

    def __init__(self, limit: int):
        self.limit = limit
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, jobs: list[Job]) -> None:
        """All of `jobs` or none (QueueFull): a request with several prompts is admitted whole."""
        with self._cond:
            if self.closed:
                raise ShuttingDown()
            if len(self._jobs) + len(jobs) > self.limit:
                raise QueueFull()
            self._jobs.extend(jobs)
            self._cond.notify()

    def take(self, max_batch: int, ctx: int, timeout: float = 0.5) -> list[Job]:
        """The oldest live job and up to max_batch - 1 later ones that can share its batch ([] on timeout)."""
        with self._cond:
            while True:
                while self._jobs and self._jobs[0].cancelled:
                    self._jobs.popleft()
                if self._jobs or self.closed:
                    break
                if not self._cond.wait(timeout):
                    return []
            if not self._jobs:
                return []
            first = self._jobs.popleft()
            key = first.batch_key(ctx)
            batch = [first]
            if key is not None and max_batch > 1:
                longest, most = len(first.ids), first.max_tokens
                keep: deque[Job] = deque()
                for job in self._jobs:
                    fits = (len(batch) < max_batch and not job.cancelled and job.batch_key(ctx) == key
                            and (key == "classify"
                                 or max(longest, len(job.ids)) + max(most, job.max_tokens) <= ctx))
                    if fits:
                        batch.append(job)
                        longest, most = max(longest, len(job.ids)), max(most, job.max_tokens)
                    elif not job.cancelled:
                        keep.append(job)
                self._jobs = keep
            return batch

    def close(self) -> list[Job]:
        """Refuse new jobs; returns the ones still waiting (the caller fails them)."""
        with self._cond:
            self.closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
            return left


# ----------------------------------------------------------------------------------------------- backends


class LMBackend:
    """A language-model (pretraining) run loaded as `kiln.api.sample` loads it: same device, same precision."""

    kind = "complete"

    def __init__(self, run_dir: Path, which: str = "latest", device: str = "auto", precision: str = "auto"):
        from kiln.run.load import load_for_decoding

        model, tokenizer, cfg, self.device, self.precision = load_for_decoding(run_dir, which, device, precision)
        if cfg.model.arch != "decoder":
            raise KilnError(f"{run_dir} is a {cfg.model.arch} run: it does not generate text, and kiln serve "
                            "serves language-model (decoder) runs and classifier runs")
        if tokenizer is None:
            raise KilnError(f"{run_dir}: no tokenizer.json; cannot encode a text prompt")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.context_length = cfg.model.context_length
        self.info = {"kind": "completion", "context_length": self.context_length,
                     "vocab_size": cfg.model.vocab_size, "device": self.device, "precision": self.precision,
                     "parameters": sum(p.numel() for p in model.parameters())}

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt, as kiln.api.sample encodes it; ValueError (a message for the user) if the
        tokenizer cannot encode it."""
        from kiln.data.tokenizer import encode_text

        try:
            ids = encode_text(self.tokenizer, prompt, "prompt")
        except KilnError as e:
            raise ValueError(str(e).removeprefix("prompt: ")) from None
        except Exception as e:  # e.g. a character-level vocabulary without [UNK] meeting an unseen character
            raise ValueError(f"the tokenizer cannot encode this prompt ({str(e).splitlines()[0]})") from None
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def warm_up(self) -> None:
        import torch

        self.model.generate(torch.zeros(1, 1, dtype=torch.long, device=self.device), 2, greedy=True)

    def run(self, jobs: list[Job], stopping: threading.Event) -> int:
        """Decode `jobs` (one batch key) together; report each job's text through its callbacks. Returns how
        many were cancelled midway (their clients went away: the batch stops early when all have)."""
        import torch

        B = len(jobs)
        T = max(len(j.ids) for j in jobs)
        x = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for i, j in enumerate(jobs):  # left padding: every row's last prompt token sits at T - 1
            x[i, T - len(j.ids):] = torch.tensor(j.ids)
            mask[i, T - len(j.ids):] = True
        x, mask = x.to(self.device), mask.to(self.device)
        first = jobs[0]
        gen = torch.Generator(device=self.device).manual_seed(first.seed) if first.seed is not None else None
        rows = [_Row(j, self.tokenizer) for j in jobs]

        def step(new_ids: torch.Tensor) -> torch.Tensor:  # generate's stop hook: called after every token
            new = new_ids.tolist()
            for row, ids in zip(rows, new):
                if not row.finished:
                    row.advance(ids, cancel=stopping.is_set())
            return torch.tensor([r.finished for r in rows], device=new_ids.device)

        self.model.generate(x, max(j.max_tokens for j in jobs), temperature=first.temperature, top_k=first.top_k,
                            top_p=first.top_p, greedy=first.greedy, generator=gen, stop=step,
                            attention_mask=mask if B > 1 else None)  # one row: exactly kiln.api.sample's call
        for row in rows:
            row.finish()
        return sum(r.reason == "cancelled" for r in rows)


class _Row:
    """One job's decoding state: when it is finished, and the text that is safe to stream so far."""

    def __init__(self, job: Job, tokenizer):
        self.job, self.tok = job, tokenizer
        self.stop = [s for s in job.stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.finished = False
        self.reason = "length"
        self.sent = ""

    def advance(self, ids: list[int], cancel: bool = False) -> None:
        self.ids = ids
        if self.job.cancelled or cancel:
            self.finished, self.reason = True, "cancelled"
            return
        if not self.stop and not self.job.on_delta:
            self.finished = len(ids) >= self.job.max_tokens
            return
        text = self.tok.decode(ids)
        if any(s in text for s in self.stop):  # the test kiln.api.sample makes: stop inside the decoded new text
            self.finished, self.reason = True, "stop"
        elif len(ids) >= self.job.max_tokens:
            self.finished = True
        elif self.job.on_delta:
            self._send(_streamable(text, self.stop, self.hold))

    def text(self) -> str:
        text = self.tok.decode(self.ids)  # kiln.api.sample: decode the new tokens, cut before the first stop
        cut = min((text.index(s) for s in self.stop if s in text), default=len(text))
        return text[:cut]

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.job.on_delta(text[len(self.sent):])
            self.sent = text

    def finish(self) -> None:
        if self.reason == "cancelled":
            self.job.on_error(ShuttingDown() if not self.job.cancelled else _Cancelled())
            return
        text = self.text()
        if self.job.on_delta:
            if not text.startswith(self.sent):  # a tokenizer whose decode is not prefix-stable: cannot unsend
                text = self.sent + text[len(self.sent):]
            self._send(text)
        self.job.on_done({"text": text, "finish_reason": self.reason, "completion_tokens": len(self.ids),
                          "prompt_tokens": len(self.job.ids)})


class _Cancelled(Exception):
    """The client went away."""


def _streamable(text: str, stop: list[str], hold: int) -> str:
    """The part of `text` that no later token can change: not a trailing partial UTF-8 character (decoded as
    U+FFFD) and not a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    for n in range(min(hold, len(text)), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stop):
            return text[:-n]
    return text


def load_classifier_backend(run_dir: Path, which: str, device: str):
    """Everything `kiln serve` needs of a classifier run: (label names, whether it reads text pairs,
    predict(texts, pairs) -> class probabilities [n, n_classes] as `kiln predict` computes them, a model
    description). The only place kiln.serve touches the classification task's internals."""
    from kiln.data import tasks
    from kiln.run.device import resolve_device
    from kiln.tasks.classify_files import load_classifier
    from kiln.tasks.text import encode_examples, predict_probs, prepare_tokenizer

    device = resolve_device(device, what="--device")
    model, tokenizer, cfg, labels = load_classifier(run_dir, which, device=device)
    tok = prepare_tokenizer(tokenizer, cfg.data.max_length)
    pad = cfg.model.pad_token_id if cfg.model.pad_token_id >= 0 else 0
    batch_size = max(2 * cfg.train.batch_size, 16)  # as kiln predict

    def predict(texts: list[str], pairs: list[str] | None = None):
        rows = [tasks.Example(t, None, pairs[i] if pairs is not None else None) for i, t in enumerate(texts)]
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


def _run_kind(run: Path) -> str:
    try:
        from kiln.run.folder import run_kind
    except ImportError:  # the layout before run.json
        for name, kind in (("classify.yaml", "classify"), ("seq2seq.yaml", "seq2seq"), ("config.yaml", "pretrain")):
            if (run / name).is_file():
                return kind
        raise KilnError(f"{run} is not a kiln run folder (no config.yaml or classify.yaml)") from None
    return run_kind(run)


def open_run(run_dir: str | Path, which: str | None = None, device: str = "auto", precision: str = "auto"):
    """The backend for a servable run folder, or a KilnError saying why this folder is not one."""
    run = Path(run_dir)
    if not run.exists():
        raise KilnError(f"run folder not found: {run}")
    if not run.is_dir():
        raise KilnError(f"{run} is not a run folder")
    try:
        kind = _run_kind(run)
    except KilnError as e:
        raise KilnError(f"{e}: kiln serve needs a language-model run (kiln pretrain) or a classifier run "
                        "(kiln finetune classify)") from None
    if kind == "classify":
        return ClassifierBackend(run, which or "best", device)
    if kind == "pretrain":
        return LMBackend(run, which or "latest", device, precision)
    raise KilnError(f"{run} is a {kind} run: kiln serve serves language-model runs (OpenAI completions) and "
                    "classifier runs (/v1/classify)" + ("; use `kiln translate` for it" if kind == "seq2seq" else ""))


# ----------------------------------------------------------------------------------------------- the worker


class Engine:
    """The queue plus the worker thread that owns the model."""

    def __init__(self, backend, max_batch: int = 8, queue: int = 64):
        self.backend = backend
        self.max_batch = max_batch
        self.queue = JobQueue(queue)
        self.stopping = threading.Event()
        self.stats = {"batches": 0, "jobs": 0, "largest_batch": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._loop, name="kiln-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        self.queue.put(jobs)

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while not self.stopping.is_set():
                batch = self.queue.take(self.max_batch, self.backend.context_length)
                if not batch:
                    if self.queue.closed:
                        return
                    continue
                self.stats["batches"] += 1
                self.stats["jobs"] += len(batch)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
                try:
                    self.stats["cancelled"] += self.backend.run(batch, self.stopping) or 0
                except Exception as e:  # a bug, not a user error: every waiting request gets a 500 (logged)
                    import traceback

                    traceback.print_exc()
                    for j in batch:
                        j.on_error(e)

    def stop(self, wait: float = 10.0) -> None:
        """Refuse new work, fail what is still waiting, let the running batch end (cut after `wait` s)."""
        for j in self.queue.close():
            j.on_error(ShuttingDown())
        self._thread.join(wait)
        self.stopping.set()
        self._thread.join(5)
