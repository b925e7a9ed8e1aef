"""kiln as users install it: a wheel built from this tree, installed into a fresh venv with nothing but the CPU
torch wheel and the wheel's own dependencies, runs the README tour's verbs on the embedded data; a verb whose
optional extra is missing says which `pip install` brings it, in one line.

Slow (a fresh venv and PyPI downloads, a few minutes): `make test-slow`, which .ci/run runs after `make test`.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def run(cmd, cwd=None, env=None, timeout=1200, check=True):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


def test_a_built_wheel_in_a_fresh_venv_runs_the_readme_tour(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q", "-w", dist])
    wheel = next(dist.glob("kiln-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    pip, kiln = venv / "bin" / "pip", venv / "bin" / "kiln"
    run([pip, "install", "-q", "torch==2.13.0"])  # the CPU wheel first, as the Makefile does
    run([pip, "install", "-q", wheel])
    listed = run([pip, "list", "--format=freeze"]).stdout.lower()
    assert "transformers" not in listed and "fastapi" not in listed  # optional extras stay optional

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = tmp_path / "work"
    work.mkdir()
    tiny = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context_length", "32",
            "--train.max_steps", "20", "--train.eval_every", "10", "--train.batch_size", "4",
            "--train.sample_tokens", "0", "--train.precision", "fp32", "--train.tensorboard", "false"]
    # pretrain on the embedded default corpus (package data), then resume, eval, generate, plot, prepare
    run([kiln, "pretrain", "--out", "runs/a", *tiny], cwd=work, env=env)
    run([kiln, "pretrain", "--resume", "runs/a", "--train.max_steps", "24"], cwd=work, env=env)
    held = work / "held.txt"
    held.write_text("ROMEO:\nWhat light through yonder window breaks?\n" * 20)
    ev = run([kiln, "eval", "runs/a", held], cwd=work, env=env)
    assert "perplexity" in ev.stdout
    gen = run([kiln, "generate", "runs/a", "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0"],
              cwd=work, env=env)
    assert gen.stdout.startswith("ROMEO:")
    run([kiln, "viz", "compare", "runs/a", "--out", "c.png"], cwd=work, env=env)
    assert (work / "c.png").stat().st_size > 0
    run([kiln, "data", "prepare", "--data.source", held, "--out", "prep"], cwd=work, env=env)
    assert (work / "prep" / "manifest.json").is_file()
    run([kiln, "models"], cwd=work, env=env)
    for task in ("classify", "seq2seq"):
        assert "config keys" in run([kiln, "finetune", task, "--help"], cwd=work, env=env).stdout
    # a verb whose extra is not installed: one line naming the pip command, exit 2
    serve = run([kiln, "serve", "runs/a", "--port", "0"], cwd=work, env=env, check=False)
    assert serve.returncode == 2 and "pip install" in serve.stderr and "kiln[serve]" in serve.stderr, serve.stderr
    assert len(serve.stderr.strip().splitlines()) == 1 and "Traceback" not in serve.stderr
