"""Parquet wherever CSV/JSONL are accepted: pretraining sources (a file or a folder of them, streamed in record
batches) give the tokens their JSONL twin gives; classify and seq2seq task files read as their CSV/TSV twins (a
classifier trained on either has the same split fingerprints and the same first losses); bad input is one line,
exit 2, nothing written."""

import csv
import json
import random
import sys

import numpy as np
import pytest

from conftest import assert_user_error
from kiln.cli import main
from kiln.config import DataConfig
from kiln.data import TokenShards, prepare
from kiln.data.text import Corpus
from kiln.errors import KilnError

import pyarrow as pa
import pyarrow.parquet as pq
pytestmark = pytest.mark.usefixtures("one_thread")
quiet = lambda *a: None  # noqa: E731


def write_parquet(path, columns: dict, row_group_size: int | None = None):
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return path


def docs(n=60):
    return [f"Document {i}: the {['quick', 'lazy', 'brown'][i % 3]} fox number {i * 7} jumps.\nSecond line {i}."
            for i in range(n)]


def tokens(folder, split):
    s = TokenShards(folder, split)
    return s.read(0, len(s))


# ------------------------------------------------------------------------------------------ pretraining


def test_parquet_source_prepares_as_its_jsonl_twin(tmp_path):
    rows = docs(60) + docs(60)[:10]  # 10 exact duplicates
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in rows) + "\n")
    write_parquet(tmp_path / "d.parquet", {"id": list(range(70)), "body": rows}, row_group_size=16)
    folder = tmp_path / "parts"  # the same rows split over three files (read in name order)
    folder.mkdir()
    for i, (a, b) in enumerate(((0, 25), (25, 50), (50, 70))):
        write_parquet(folder / f"part-{i}.parquet", {"body": rows[a:b]})
    out = {}
    for src in ("d.jsonl", "d.parquet", "parts"):
        m = prepare(DataConfig(source=str(tmp_path / src), text_field="body", dedup=True, val_fraction=0.3),
                    tmp_path / f"out-{src}", log=quiet)
        assert m["documents"] == 60 and m["duplicates_dropped"] == 10 and m["split"] == "hash", src
        out[src] = (tokens(tmp_path / f"out-{src}", "train"), tokens(tmp_path / f"out-{src}", "val"))
    for src in ("d.parquet", "parts"):
        assert all(np.array_equal(a, b) for a, b in zip(out[src], out["d.jsonl"])), src


def test_parquet_is_streamed_in_record_batches(tmp_path):
    texts = [f"row {i} " + "x" * 200 for i in range(5000)]
    write_parquet(tmp_path / "big.parquet", {"text": texts}, row_group_size=500)
    corpus = Corpus(str(tmp_path / "big.parquet"))
    assert corpus.kind == "parquet" and not corpus.single_file
    it = corpus.documents()
    assert next(it) == texts[0]
    assert 0 < corpus.bytes_read < corpus.nbytes / 2  # one record batch read, not the file
    rest = list(it)
    assert rest == texts[1:] and corpus.bytes_read == corpus.nbytes


def test_arrow_memory_stays_at_one_batch_whatever_the_file_size(tmp_path):
    """pyarrow's pre-buffering kept every column chunk read so far (a 1 GB file peaked at 1.19 GB RSS): the
    Arrow memory in use while streaming must stay far below the text column's size."""
    rng = random.Random(0)
    texts = ["".join(rng.choices("abcdefghij klmnopqrstuvwxyz", k=2000)) for _ in range(8000)]  # 16 MB, 16 row
    # groups, hardly compressible (the pre-buffered chunks are the compressed bytes)
    write_parquet(tmp_path / "m.parquet", {"text": texts}, row_group_size=500)
    peak, n = 0, 0
    for doc in Corpus(str(tmp_path / "m.parquet")).documents():
        n += 1
        if n % 250 == 0:
            peak = max(peak, pa.total_allocated_bytes())
    assert n == 8000 and peak < 8e6, peak  # 4 MB: a batch of 1024 rows; with pre-buffering ~16 MB


def test_nulls_are_skipped_and_other_text_types_refused(tmp_path):
    write_parquet(tmp_path / "n.parquet", {"text": ["a b", None, "c"]})
    assert list(Corpus(str(tmp_path / "n.parquet")).documents()) == ["a b", "c"]
    write_parquet(tmp_path / "ints.parquet", {"text": [1, 2]})
    with pytest.raises(KilnError, match=r"column 'text' holds int64, expected strings"):
        Corpus(str(tmp_path / "ints.parquet"))


def test_bad_parquet_sources_are_one_line_and_write_nothing(tmp_path, capsys):
    fake = tmp_path / "fake.parquet"
    fake.write_text("text\nthis is a CSV file\n")
    out = tmp_path / "prepared"
    assert_user_error(capsys, ["data", "prepare", "--out", out, "--data.source", fake], "fake.parquet",
                      "not a Parquet file")
    write_parquet(tmp_path / "cols.parquet", {"id": [1], "body_text": ["hello"]})
    err = assert_user_error(capsys, ["data", "prepare", "--out", out, "--data.source", tmp_path / "cols.parquet"],
                            "no column 'text'", "columns present: 'id', 'body_text'", "set data.text_field")
    assert "did you mean" not in err or "'body_text'" in err
    write_parquet(tmp_path / "near.parquet", {"txt": ["hello"]})
    assert_user_error(capsys, ["data", "prepare", "--out", out, "--data.source", tmp_path / "near.parquet"],
                      "did you mean 'txt'")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("hello")
    write_parquet(mixed / "b.parquet", {"text": ["hi"]})
    assert_user_error(capsys, ["data", "prepare", "--out", out, "--data.source", mixed], "both .txt and .parquet")
    bad_in_folder = tmp_path / "parts"
    bad_in_folder.mkdir()
    write_parquet(bad_in_folder / "a.parquet", {"text": ["fine"]})
    (bad_in_folder / "b.parquet").write_bytes(b"PAR1 not really")
    assert_user_error(capsys, ["data", "prepare", "--out", out, "--data.source", bad_in_folder], "b.parquet",
                      "not a Parquet file")
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))


def test_without_pyarrow_the_error_names_the_extra(tmp_path, monkeypatch):
    write_parquet(tmp_path / "d.parquet", {"text": ["hello"]})
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if pyarrow were not installed
    with pytest.raises(KilnError, match=r"needs pyarrow: pip install 'kiln\[parquet\]'"):
        Corpus(str(tmp_path / "d.parquet"))


# ------------------------------------------------------------------------------------------ task files

POS, NEG = ["good", "great", "superb", "lovely"], ["bad", "awful", "poor", "dull"]
FILLER = ["the", "movie", "was", "plot", "actors", "really", "and", "a", "story", "film"]


def reviews(n: int):
    rng = random.Random(0)
    out = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, rng.randint(2, 5)) + [rng.choice(POS if label else NEG)]
        rng.shuffle(words)
        out.append((label, " ".join(words)))
    return out


def backbone(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kiln.model.config import ModelConfig
    from task_data import save_backbone

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]"] + POS + NEG + FILLER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = ModelConfig(arch="encoder", vocab_size=len(vocab), n_layer=1, n_head=2, d_model=16, context_length=16,
                      pad_token_id=0)
    return save_backbone(path, tok, cfg)


def _losses(run):
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


def test_a_parquet_task_file_trains_as_its_csv_twin(tmp_path, capsys):
    rows = reviews(100) + reviews(100)[:5]  # duplicates: dropped before the split in both
    with open(tmp_path / "r.csv", "w", newline="") as f:
        csv.writer(f).writerows([("label", "text"), *rows])
    write_parquet(tmp_path / "r.parquet", {"text": [t for _, t in rows], "extra": [1.5] * len(rows),
                                           "label": [lab for lab, _ in rows]})  # integer labels, as CSV's "0"/"1"
    base = backbone(tmp_path / "base")
    runs = {}
    for src in ("r.csv", "r.parquet"):
        runs[src] = tmp_path / f"run-{src}"
        assert main(["finetune", "classify", "--data.train", str(tmp_path / src), "--init", str(base), "--out",
                     str(runs[src]), "--data.max_length", "8", "--train.max_steps", "6", "--train.batch_size", "8",
                     "--train.log_every", "1", "--train.threads", "1", "--train.precision", "fp32",
                     "--train.tensorboard", "false", "--seed", "0"]) == 0
    capsys.readouterr()
    a, b = (json.loads((runs[s] / "data.json").read_text()) for s in ("r.csv", "r.parquet"))
    assert a["duplicates_dropped"] == b["duplicates_dropped"] == 5
    assert [a["splits"][k]["fingerprint"] for k in ("train", "val", "test")] == \
           [b["splits"][k]["fingerprint"] for k in ("train", "val", "test")]
    la, lb = _losses(runs["r.csv"]), _losses(runs["r.parquet"])
    assert len(la) == 6 and la[:3] == lb[:3]
    assert json.loads((runs["r.parquet"] / "labels.json").read_text())["labels"] == ["0", "1"]

    # predict on a Parquet file: its "line" column is the row number
    write_parquet(tmp_path / "new.parquet", {"text": ["a lovely film", "", "dull plot"]})
    assert main(["predict", str(runs["r.parquet"]), str(tmp_path / "new.parquet"), "--out", str(tmp_path / "p.csv")]) == 0
    assert "skipped 1 row(s) with an empty text (line 2)" in capsys.readouterr().out
    with open(tmp_path / "p.csv", newline="") as f:
        assert [r["line"] for r in csv.DictReader(f)] == ["1", "3"]


def test_bad_parquet_task_files_are_one_line_and_write_nothing(tmp_path, capsys):
    base = backbone(tmp_path / "base")
    (tmp_path / "fake.parquet").write_text("label,text\n1,hello\n")
    write_parquet(tmp_path / "cols.parquet", {"review": ["a", "b"], "label": [0, 1]})
    write_parquet(tmp_path / "lab.parquet", {"text": ["a", "b"], "labels": [0, 1]})
    write_parquet(tmp_path / "empty.parquet", {"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())})
    run = tmp_path / "run"
    for name, needles in (("fake.parquet", ["not a Parquet file"]),
                          ("cols.parquet", ["no text column 'text'", "columns present: 'review', 'label'",
                                            "(set data.text_field)"]),
                          ("lab.parquet", ["no label column 'label'", "did you mean 'labels'"]),
                          ("empty.parquet", ["no data rows"]),
                          ("missing.parquet", ["data file not found"])):
        err = assert_user_error(capsys, ["finetune", "classify", "--data.train", tmp_path / name, "--init", base,
                                         "--out", run], name, *needles)
        assert "data.header" not in err  # the CSV hints do not apply
    assert not run.exists()


def test_seq2seq_pairs_read_from_parquet_as_from_tsv(tmp_path):
    from kiln.data.pairs import read_pairs

    pairs = [("hello", "hola"), ("", "vacío"), ("good night", "buenas noches"), ("thanks", "")]
    with open(tmp_path / "p.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([("source", "target"), *pairs])
    write_parquet(tmp_path / "p.parquet", {"source": [s for s, _ in pairs], "target": [t for _, t in pairs]})
    a, ra = read_pairs(tmp_path / "p.tsv", "source", "target")
    b, rb = read_pairs(tmp_path / "p.parquet", "source", "target")
    assert [(p.source, p.target) for p in a] == [(p.source, p.target) for p in b] == [pairs[0], pairs[2]]
    assert (ra.rows, ra.empty_source, ra.empty_target) == (rb.rows, rb.empty_source, rb.empty_target) == (4, 1, 1)
    assert [p.line for p in b] == [1, 3]
    with pytest.raises(KilnError, match=r"no target column 'tgt'.*columns present: 'source', 'target'"):
        read_pairs(tmp_path / "p.parquet", "source", "tgt")
