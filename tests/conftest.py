import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `make test` (pytest -n): each worker its share of the cores,
    # for torch here and for the kiln/torchrun processes tests start (not every worker all of them)
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"  # small data files the tests read (tests/assets/README.md: sources, licenses)
SHAKESPEARE = ROOT / "src" / "kiln" / "assets" / "tinyshakespeare.txt"
# The tests sit in one folder per layer of src/kiln (tests/README.md); a test may import another's helpers by
# module name (`from test_classify import make_backbone`) wherever the two files sit
for _folder in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and p.name not in ("assets", "__pycache__")):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

# A tiny GPT that trains for real in a second or two.
TINY = ["--model.n_layer", "2", "--model.n_head", "2", "--model.d_model", "32", "--model.context_length", "32",
        "--model.position", "learned",  # the GPT-2 layout (HF export, golden losses), whatever the default recipe's
        "--train.batch_size", "4", "--train.warmup_steps", "2", "--train.eval_every", "10",
        "--train.eval_batches", "2", "--train.log_every", "1", "--train.sample_tokens", "0",
        "--train.tensorboard", "false", "--train.precision", "fp32", "--train.threads", "1",
        "--train.lr", "1e-2", "--train.min_lr", "1e-3"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """The first 30k characters of tiny Shakespeare as a standalone file."""
    f = tmp_path / "corpus.txt"
    f.write_text(SHAKESPEARE.read_text()[:30_000])
    return f


def assert_user_error(capsys, argv, *needles) -> str:
    """Run the CLI in-process and check the contract for a user mistake: exit 2, one line, no traceback."""
    from kiln.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("kiln: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster than two fighting over a shared CPU (modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def run_until_crash(run, step: int) -> None:
    """Call run() and let its training die right after optimizer step `step`, as if the process were killed
    there (the trainer's train_step raises SystemExit; nothing after it runs)."""
    from kiln.train.trainer import Trainer

    original = Trainer.train_step

    def dying(self):
        if self.state.step == step:
            raise SystemExit("simulated crash")
        return original(self)

    Trainer.train_step = dying
    try:
        with pytest.raises(SystemExit):
            run()
    finally:
        Trainer.train_step = original
