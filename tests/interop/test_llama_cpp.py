"""llama.cpp itself reads kiln's GGUF export: SmolLM2-135M-Instruct imported from its GGUF file, exported by
`kiln export gguf --dtype f32`, loaded by llama.cpp (llama-cpp-python), whose greedy reply to a chat prompt starts
with the same 16 tokens as kiln's. Both get the same prompt ids (kiln's tokenizer), so the test is about the
weights, the architecture metadata and the arithmetic, not tokenization. Why it holds on any CPU: f32 weights in
both, and the reply's first 16 greedy tokens of this prompt have margins well above float rounding (a Q4_1 file
is not compared: quantized dot products flip near-ties, issue notes).

Slow (`make test-slow`): llama-cpp-python is built from its PyPI sdist when missing (~4 minutes on 2 cores),
portable (no -march=native: a native build segfaulted on an Intel AMX machine).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from kiln.cli import main

pytestmark = pytest.mark.slow
PORTABLE = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


def llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        env = {**os.environ, "CMAKE_ARGS": PORTABLE}
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "llama-cpp-python"], env=env, check=True)
    import llama_cpp

    return llama_cpp


def test_llama_cpp_greedy_reply_starts_with_kilns_16_tokens(tmp_path):
    from test_gguf import smollm_file

    from kiln.data.chat import ChatTemplate
    from kiln.run.load import load

    run, out = tmp_path / "smollm2", tmp_path / "smollm2-f32.gguf"
    assert main(["import", "gguf", str(smollm_file()), str(run)]) == 0
    assert main(["export", "gguf", str(run), str(out), "--dtype", "f32"]) == 0
    model, tokenizer, _ = load(run)
    text = ChatTemplate.of_run(run).render([{"role": "user", "content": "What is the capital of France?"}])
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), 16, greedy=True)[0, len(ids):].tolist()
    llm = llama_cpp().Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    theirs = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 16:
            break
    assert theirs == ours, (tokenizer.decode(theirs), tokenizer.decode(ours))
