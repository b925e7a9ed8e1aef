"""`kiln serve RUN_DIR`: an HTTP server for a run, in the OpenAI API's shape.

A language-model run: POST /v1/completions and /v1/chat/completions (the run's chat template; streaming with
`stream: true`), GET /v1/models; a classifier run:
POST /v1/classify. Both: GET /health and GET / (a playground page). Needs `pip install 'kiln[serve]'`.

    from kiln.serve import serve
    serve("runs/demo-...", port=8000)          # blocks until Ctrl-C / SIGTERM
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from kiln.errors import KilnError, require


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line KilnError (the port is taken, the host is not ours)."""
    if not 0 <= port <= 65535:
        raise KilnError(f"--port must be 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise KilnError(f"--host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # reuse TIME_WAIT, never a live listener
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = "the port is already in use; pick another with --port" if e.errno in (98, 48, 10048) else e.strerror
        raise KilnError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, queue: int = 64,
          which: str | None = None, device: str = "auto", precision: str = "auto", log=print) -> None:
    """Serve a run until SIGINT/SIGTERM. which: checkpoint (default latest for a language model, best for a
    classifier); device/precision as `kiln generate`'s."""
    require("fastapi", "serve", "`kiln serve`")
    uvicorn = require("uvicorn", "serve", "`kiln serve`")
    if max_batch < 1:
        raise KilnError(f"--max-batch must be >= 1, got {max_batch}")
    if queue < 1:
        raise KilnError(f"--queue must be >= 1, got {queue}")
    from kiln.serve.app import create_app
    from kiln.serve.engine import Engine, open_run

    sock = bind(host, port)
    try:
        backend = open_run(run_dir, which, device, precision)
        backend.warm_up()
    except BaseException:
        sock.close()
        raise
    engine = Engine(backend, max_batch=max_batch, queue=queue)
    engine.start()
    model_id = Path(run_dir).resolve().name
    app = create_app(engine, model_id)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # a signal is a request to stop, answered by stopping cleanly:
            super().handle_exit(sig, frame)  # not re-raised after shutdown (uvicorn would, to die by it)
            getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                            lifespan="on")
    server = Server(config)
    url = _url(sock)
    what = "classifier (POST /v1/classify)" if backend.kind == "classify" else \
        "speech recognition (POST /v1/audio/transcriptions)" if backend.kind == "transcribe" else \
        "audio classifier (POST /v1/audio/classifications)" if backend.kind == "classify_audio" else \
        "language model (OpenAI API at /v1: completions, chat completions, models)"
    log(f"kiln serve: {url}  {model_id}: {what}; playground at {url}/, health at {url}/health; "
        f"batches of up to {max_batch}, {queue} waiting at most")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"kiln serve: warning: listening on {host}, reachable from other machines; there is no authentication")
    sys.stdout.flush()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    log("kiln serve: stopped")
