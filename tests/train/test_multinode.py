"""Training on several machines: two torchrun "nodes" on this machine (c10d rendezvous on 127.0.0.1, gloo), one
process each, run the tiny pretraining of tests/train/test_scale.py as one job of 2 ranks and equal one process bit
for bit, as DDP on one machine does (why: the comment above RTOL in tests/train/test_scale.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from test_scale import STEPS, assert_bitwise_equal, check_rank0_only, prepared, single  # noqa: F401  (fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*kiln_args: str) -> None:
    """`kiln ARGS` as README "Training on several machines" runs it on each machine: two torchrun processes of one
    rank each, joined by a c10d rendezvous on 127.0.0.1; both must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "kiln-test",
           "-m", "kiln", *kiln_args]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]


@pytest.mark.distributed
def test_two_nodes_of_one_process_each_match_one_process(single, prepared, tmp_path):  # noqa: F811
    out = tmp_path / "two-nodes"
    two_nodes("pretrain", *STEPS, "--data.prepared", str(prepared / "a"), "--out", str(out))
    assert "distributed: 2 ranks, backend gloo, ddp" in (out / "log.txt").read_text()
    check_rank0_only(out)
    assert_bitwise_equal(single, out)
