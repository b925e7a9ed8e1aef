"""`kiln chat RUN_DIR`: a conversation with a decoder run in the terminal, or one reply for a script (-m).

A turn is one job run by the served language-model backend (kiln.serve.engine.LMBackend) exactly as
`/v1/chat/completions` runs it: the conversation rendered with the run's chat template (kiln.data.chat), the
reply streamed as its text becomes final and ended at the template's end-of-turn token. So at temperature 0
the terminal and the API give the same reply.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from kiln.errors import KilnError
from kiln.serve.jobs import Job

COMMANDS = "/reset starts a new conversation, /exit (or Ctrl-D) leaves"


def reply(backend, messages: list[dict], max_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
          top_p: float = 1.0, seed: int | None = None, on_delta=None) -> dict:
    """The assistant's next message for `messages`: {"text", "finish_reason", "completion_tokens",
    "prompt_tokens"}; on_delta(text) receives it piece by piece."""
    ids = backend.encode_chat(messages)
    room = backend.context_length - len(ids)
    max_tokens = room if max_tokens is None else min(max_tokens, room)
    _, stop_ids, stop_strings = backend.chat
    result: dict = {}

    def failed(e: BaseException) -> None:
        raise e

    job = Job("complete", result.update, failed, on_delta, ids=ids, max_tokens=max_tokens, temperature=temperature,
              top_p=top_p, top_k=top_k, seed=seed, stop=stop_strings, stop_ids=stop_ids)
    backend.run([job], threading.Event())
    return result


def chat(run_dir: str | Path, message: str | None = None, system: str | None = None, max_new_tokens: int = 512,
         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
         which: str = "latest", device: str = "auto", precision: str = "auto", read=input, out=None) -> str:
    """One reply to `message` (printed, returned), or, without one, a conversation read line by line."""
    from kiln.serve.engine import LMBackend

    out = out or sys.stdout

    backend = LMBackend(Path(run_dir), which, device, precision)
    backend.chat  # noqa: B018  (the template is read, and a broken one refused, before the first turn)
    start = [{"role": "system", "content": system}] if system else []

    def turn(history: list[dict]) -> str:
        def show(text: str) -> None:
            out.write(text)
            out.flush()

        res = reply(backend, history, max_new_tokens, temperature, top_k, top_p, seed, on_delta=show)
        out.write("\n")
        out.flush()
        return res["text"]

    if message is not None:
        return turn(start + [{"role": "user", "content": message}])
    out.write(f"kiln chat: {Path(run_dir).name} ({COMMANDS})\n")
    history = list(start)
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return ""
        if line.strip() in ("/exit", "/quit"):
            return ""
        if line.strip() == "/reset":
            history = list(start)
            out.write("(a new conversation)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            history.append({"role": "assistant", "content": turn(history)})
        except KilnError as e:  # the conversation outgrew the context: say so, keep the session
            history.pop()
            out.write(f"kiln chat: {e}\n")
