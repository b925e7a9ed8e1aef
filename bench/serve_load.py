"""`kiln serve` under load: what batching buys, measured with the real `openai` client.

    python bench/serve_load.py [--requests 200] [--clients 16] [--layers 2 --d-model 32]

Trains a small character-level language model on the embedded tiny Shakespeare (kiln.pretrain), then serves it
three ways on 127.0.0.1 (a free port each): 16 concurrent clients against the default `--max-batch 8`, one client
sending the requests one after another, and 16 clients against `--max-batch 1` (no batching). Each request asks
for a greedy completion of 8 or 32 tokens (a quarter streamed); every answer is checked against
`kiln.sample` at temperature 0. Prints p50/p95 latency and requests/s per setup and the server's batch counts;
raw results in bench/results/serve_load.json. tests/serve/test_serve.py runs `load` with a smaller load for
correctness (every answer, batching) and measures nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_json, machine  # noqa: E402

PROMPTS = ["ROMEO:", "First Citizen:\n", "What say you", "O, ", "MENENIUS:\nI", "Be", "And the", "You are all",
           "Speak, speak.", "the gods"]


def train(out: Path, layers: int, d_model: int) -> Path:
    import kiln

    return kiln.pretrain(None, overrides={"out": str(out), "model.n_layer": layers, "model.n_head": 2,
                                          "model.d_model": d_model, "model.context_length": 64,
                                          "train.max_steps": 120, "train.batch_size": 8, "train.eval_every": 1000,
                                          "train.sample_tokens": 0, "train.tensorboard": False,
                                          "train.precision": "fp32"})


def serve(run: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """A `kiln serve` process on a free port; returns it and its URL (from the line it prints)."""
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "serve", str(run), "--port", "0", "--precision", "fp32",
                             "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith("kiln serve: http://"):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, line.split()[2]
    raise SystemExit(f"kiln serve exited {proc.wait()} without printing its URL")


def health(url: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        return json.loads(r.read())["served"]


def load(url: str, model: str, expected: dict, n: int, clients: int, prompts=PROMPTS) -> dict:
    """n greedy completions of 8 or 32 tokens (a quarter streamed) from `clients` threads, each checked against
    expected[(prompt, tokens)]; latencies, requests/s and the server's batch counts over the load."""
    import openai

    rng = random.Random(0)
    work = [(rng.choice(prompts), rng.choice((8, 32)), i % 4 == 0) for i in range(n)]
    local = threading.local()

    def one(item):
        prompt, tokens, stream = item
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        t0 = time.perf_counter()
        if stream:
            parts = local.client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                                    stream=True)
            text = "".join(c.choices[0].text for c in parts if c.choices)
        else:
            text = local.client.completions.create(model=model, prompt=prompt, max_tokens=tokens,
                                                   temperature=0).choices[0].text
        if prompt + text != expected[(prompt, tokens)]:
            raise AssertionError(f"wrong answer for {prompt!r} ({tokens} tokens): {text!r}")
        return time.perf_counter() - t0

    before = health(url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = sorted(pool.map(one, work))
    wall = time.perf_counter() - t0
    after = health(url)
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"requests": n, "clients": clients, "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "rps": n / wall,
            "wall_s": wall, "batches": after["batches"] - before["batches"], "jobs": after["jobs"] - before["jobs"],
            "largest_batch": after["largest_batch"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args()
    import kiln

    print(f"machine: {machine()}\ncommand: {' '.join([sys.executable, *sys.argv])}")
    with tempfile.TemporaryDirectory() as tmp:
        run = train(Path(tmp) / "lm", args.layers, args.d_model)
        expected = {(p, n): kiln.sample(run, p, max_new_tokens=n, greedy=True, precision="fp32", device="cpu")
                    for p in PROMPTS for n in (8, 32)}
        rows = []
        for label, flags, clients in (("16 clients, --max-batch 8", [], args.clients),
                                      ("1 client (sequential)", [], 1),
                                      ("16 clients, --max-batch 1", ["--max-batch", "1"], args.clients)):
            proc, url = serve(run, *flags)
            try:
                rows.append({"label": label, **load(url, run.name, expected, args.requests, clients)})
            finally:
                proc.terminate()
                proc.wait(30)
    print(f"\nkiln serve, {args.layers} layers x d_model {args.d_model}, {args.requests} requests of 8/32 tokens")
    print(f"{'setup':<28} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} {'batches':>8}")
    for r in rows:
        print(f"{r['label']:<28} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['rps']:7.1f} {r['batches']:8d}")
    emit_json({"machine": machine(), "command": " ".join(sys.argv), "rows": rows}, args.json, echo=False)


if __name__ == "__main__":
    main()
