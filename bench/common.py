"""Shared helpers for the side-by-side benchmarks: machine facts and a HF wrapper for kiln's loop.

experiments/ imports this file by path (machine, median, emit_json): keep those names.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess

import torch


def machine() -> str:
    from kiln.run.device import cpu_bf16_flags, cpu_model

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), cpu_model())
    except OSError:
        model = cpu_model()
    flags = ",".join(cpu_bf16_flags()) or "no bf16 flags"
    return (f"{model} ({flags}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"python {platform.python_version()}, {datetime.date.today().isoformat()}")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


class HFCausalLM(torch.nn.Module):
    """Make a transformers causal LM look like kiln's model to kiln's loop: model(idx) -> logits."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        self.lm_head = hf_model.get_output_embeddings()

    def forward(self, idx, **kw):
        return self.hf(input_ids=idx, use_cache=False).logits


def emit_json(result: dict, path=None, echo: bool = True) -> None:
    """Print a benchmark's result as JSON (unless echo is off), and write it to `path` too when given."""
    import json
    from pathlib import Path

    text = json.dumps(result, indent=2)
    if echo:
        print(text)
    elif path:
        print(f"raw results: {path}")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
