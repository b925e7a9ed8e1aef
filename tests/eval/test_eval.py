"""`kiln eval RUN FILE` on pretraining runs: sliding-window perplexity (checked against Hugging Face running the
exported model), bits per byte, and its one-line errors."""

import json
import math

import pytest
import torch

from conftest import TINY, assert_user_error
from kiln.cli import main
from kiln.eval.lm import causal_windows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n,context,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (11, 4, 3), (100, 32, 16),
                                              (33, 32, 32), (34, 32, 5)])
def test_windows_score_every_token_once_within_the_context(n, context, stride):
    scored = []
    for begin, end, first in causal_windows(n, context, stride):
        assert 0 <= begin < first < end <= n and end - begin - 1 <= context  # inputs fit the model
        assert begin % stride == 0  # windows advance by the stride
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_window_stride_out_of_range_is_an_error():
    from kiln.errors import KilnError

    for stride in (0, 5):
        with pytest.raises(KilnError, match="--stride must be between 1 and the context length 4"):
            causal_windows(10, 4, stride)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from conftest import SHAKESPEARE

    tmp = tmp_path_factory.mktemp("lm")
    text = SHAKESPEARE.read_text()
    (tmp / "train.txt").write_text(text[:20_000])
    run = tmp / "run"
    assert main(["pretrain", "--data.source", str(tmp / "train.txt"), "--out", str(run), *TINY,
                 "--train.max_steps", "30"]) == 0
    held = tmp / "held.txt"  # later text, its characters all in the training part's vocabulary
    chars = set(text[:20_000])
    held.write_text("".join(c for c in text[20_000:23_000] if c in chars))
    return run, held


def hf_nll(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """Reference: the exported model in transformers, window by window; each token scored once, in the first
    window whose targets reach it."""
    total, count, done = 0.0, 0, 1
    for begin in range(0, len(ids) - 1, stride):
        window = ids[begin:begin + context + 1]
        with torch.no_grad():
            logits = model(window[None, :-1]).logits[0].float()
        targets = torch.arange(begin + 1, begin + len(window))
        new = targets >= done
        if new.any():
            total += float(torch.nn.functional.cross_entropy(logits[new], ids[targets[new]], reduction="sum"))
            count += int(new.sum())
            done = int(targets[-1]) + 1
        if begin + len(window) == len(ids):
            break
    return total, count


def test_perplexity_matches_transformers_on_the_exported_model(lm_run, tmp_path, capsys):
    import transformers
    from tokenizers import Tokenizer

    from kiln.interop.hf import export_hf

    run, held = lm_run
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf")).eval()
    ids = torch.tensor(Tokenizer.from_file(str(run / "tokenizer.json")).encode(held.read_text()).ids)
    context = 32
    for stride in (32, 8):
        out = tmp_path / f"s{stride}.json"
        assert main(["eval", str(run), str(held), "--stride", str(stride), "--out", str(out)]) == 0
        got = json.loads(out.read_text())
        total, count = hf_nll(hf, ids, context, stride)
        assert got["scored"] == count == len(ids) - 1 and got["tokens"] == len(ids)
        assert got["loss"] == pytest.approx(total / count, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
        # char tokenizer: one token per character = per byte of this ASCII text
        assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / len(held.read_bytes()), rel=1e-5)
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "bits per byte" in printed and "(context 32, stride 8)" in printed
    # the default: non-overlapping windows, written to RUN/eval/<stem>.json; the Python API returns the same
    assert main(["eval", str(run), str(held)]) == 0
    default = json.loads((run / "eval" / "held.json").read_text())
    assert default["stride"] == 32 and default["loss"] == pytest.approx(
        json.loads((tmp_path / "s32.json").read_text())["loss"], rel=1e-6)
    import kiln

    api = kiln.evaluate(run, held, tmp_path / "api.json", stride=8, batch_size=3, log=lambda *a: None)
    assert api == json.loads((tmp_path / "api.json").read_text())
    assert api["loss"] == pytest.approx(json.loads((tmp_path / "s8.json").read_text())["loss"], rel=1e-6)


def test_documents_are_scored_with_an_end_of_text_between_them(tmp_path):
    """A .jsonl is many documents: the text goes through the tokenizer as `kiln data prepare` sends it."""
    from kiln.eval.lm import read_tokens
    from kiln.data.tokenizer import train_tokenizer

    docs = ["the cat sat on the mat", "a dog ran in the park", "", "birds sing at dawn"]
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"body": d}) for d in docs) + "\n")
    tok = train_tokenizer("bpe", docs * 20, vocab_size=300)
    ids, n_docs, nbytes = read_tokens(f, tok, "body")
    eot = tok.token_to_id("<|endoftext|>")
    assert n_docs == 3 and nbytes == sum(len(d) for d in docs)
    assert eot is not None and ids.tolist().count(eot) == 3 and ids[-1] == eot
    assert tok.decode([i for i in ids.tolist() if i != eot]).replace(" ", "") == "".join(docs).replace(" ", "")


def test_eval_errors_are_one_line(lm_run, tmp_path, capsys):
    run, held = lm_run
    assert_user_error(capsys, ["eval", tmp_path / "nope", held], "run folder not found")
    assert_user_error(capsys, ["eval", tmp_path, held], "is not a kiln run folder")
    assert_user_error(capsys, ["eval", run, tmp_path / "missing.txt"], "missing.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("the year of the señor\n".encode("latin-1"))
    assert_user_error(capsys, ["eval", run, latin], "latin.txt", "UTF-8")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_user_error(capsys, ["eval", run, tmp_path / "empty.txt"], "empty.txt", "at least 2")
    assert_user_error(capsys, ["eval", run, held, "--stride", "33"], "--stride must be between 1 and")
    assert_user_error(capsys, ["eval", run, held, "--batch-size", "0"], "--batch-size")


def test_viz_compare_plots_several_runs_and_reports_last_and_best(lm_run, tmp_path, capsys):
    import csv

    run, _ = lm_run
    other = tmp_path / "other"
    assert main(["pretrain", "--data.source", str(run / "data"), "--out", str(other), *TINY,
                 "--data.prepared", str(run / "data"), "--train.max_steps", "20", "--train.lr", "3e-3"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp.png"
    assert main(["viz", "compare", str(run), str(other), "--metric", "loss,val_loss", "--labels", "a,b",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out.splitlines()
    for label, folder in (("a", run), ("b", other)):
        vals = [float(r["val_loss"]) for r in csv.DictReader(open(folder / "metrics.csv")) if r["val_loss"]]
        line = next(li for li in printed if li.startswith(f"{label} ") and " val_loss " in li).split()
        assert float(line[2]) == pytest.approx(vals[-1], rel=1e-3) and float(line[3]) == pytest.approx(min(vals), rel=1e-3)
    assert_user_error(capsys, ["viz", "compare", run, other, "--metric", "val_los"], "did you mean 'val_loss'")
    assert_user_error(capsys, ["viz", "compare", run, "--x", "time"], "--x must be one of step, tokens, elapsed")
    assert_user_error(capsys, ["viz", "compare", run, "--metric", ","], "--metric names no metrics.csv column")
    assert_user_error(capsys, ["viz", "compare", run, other, "--labels", "a"], "--labels names 1 run(s) for 2")
    assert_user_error(capsys, ["viz", "compare", run, tmp_path / "nope"], "run folder not found")
