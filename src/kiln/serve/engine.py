"""The model side of `kiln serve`: one worker thread that batches the queued jobs onto the model.

No web framework here (kiln.serve.app is the HTTP face). The worker takes the oldest waiting request and
every other waiting one it can run in the same forward passes (up to --max-batch; kiln.serve.jobs holds the
queue and the batching rule), runs them together, and starts again. open_run picks the backend for a run
folder: a language model (LMBackend, here) or a classifier (kiln.serve.classifier).

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
from pathlib import Path

from kiln.errors import KilnError
from kiln.serve.classifier import ClassifierBackend
from kiln.serve.jobs import Cancelled, Job, JobQueue, ShuttingDown

# ----------------------------------------------------------------------------------------------- language models


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
        self.run_dir = Path(run_dir)
        self._chat = None
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

    @property
    def chat(self):
        """(ChatTemplate, end-of-turn token ids, end-of-turn strings) of the run, read when first needed."""
        if self._chat is None:
            from kiln.data.chat import ChatTemplate, stop_tokens
            from kiln.run.checkpoint import find_checkpoint

            root = self.run_dir
            if not (root / "config.yaml").is_file():  # a checkpoint folder: its run holds the template
                root = find_checkpoint(root, "latest").parent.parent
            template = ChatTemplate.of_run(root)
            self._chat = (template, *stop_tokens(self.tokenizer, template))
        return self._chat

    def encode_chat(self, messages: list[dict], reserve: int = 1) -> list[int]:
        """Token ids of a conversation rendered with the run's chat template (KilnError: bad messages, a template
        that fails, longer than the context)."""
        from kiln.data.chat import encode_chat

        return encode_chat(self.tokenizer, self.chat[0], messages, self.context_length, reserve)

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
        self.count = 0  # tokens generated (the end-of-turn token included)
        self.finished = False
        self.reason = "length"
        self.sent = ""

    def advance(self, ids: list[int], cancel: bool = False) -> None:
        self.ids, self.count = ids, len(ids)
        if self.job.cancelled or cancel:
            self.finished, self.reason = True, "cancelled"
            return
        if ids and ids[-1] in self.job.stop_ids:  # the end-of-turn token: the reply is the tokens before it
            self.ids, self.finished, self.reason = ids[:-1], True, "stop"
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
            self.job.on_error(ShuttingDown() if not self.job.cancelled else Cancelled())
            return
        text = self.text()
        if self.job.on_delta:
            if not text.startswith(self.sent):  # a tokenizer whose decode is not prefix-stable: cannot unsend
                text = self.sent + text[len(self.sent):]
            self._send(text)
        self.job.on_done({"text": text, "finish_reason": self.reason, "completion_tokens": self.count,
                          "prompt_tokens": len(self.job.ids)})


def _streamable(text: str, stop: list[str], hold: int) -> str:
    """The part of `text` that no later token can change: not a trailing partial UTF-8 character (decoded as
    U+FFFD) and not a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    for n in range(min(hold, len(text)), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stop):
            return text[:-n]
    return text


# ----------------------------------------------------------------------------------------------- the run folder


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
    if kind in ("asr", "audio"):  # POST /v1/audio/transcriptions, /v1/audio/classifications
        from kiln.serve.speech import SpeechBackend

        return SpeechBackend(run, which or "best", device)
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
