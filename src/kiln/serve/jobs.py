"""The jobs of `kiln serve` and the bounded queue they wait in: the contract between the HTTP routes (which
put jobs) and the engine's worker thread (which takes them in batches).

Requests beyond --queue waiting are refused at once (QueueFull -> HTTP 503), so memory stays bounded under
any load. take() hands the worker the oldest waiting job and every later one that can share its forward
passes (up to --max-batch): static batching of the requests that arrive while a batch runs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


class QueueFull(Exception):
    """More requests are waiting than --queue allows."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


class Cancelled(Exception):
    """The client went away."""


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
    stop_ids: list[int] = field(default_factory=list)  # a chat reply ends at its template's end-of-turn token
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
