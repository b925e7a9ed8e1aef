"""Data preparation: real files in tmp_path, real tokenizers."""

from __future__ import annotations

import csv
import json
import string

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from kiln.config import DataConfig
from kiln.data import TokenShards, load_tokenizer, prepare, read_manifest, train_tokenizer
from kiln.data.shards import ShardWriter
from kiln.data.text import EMBEDDED, Corpus, clean_text
from kiln.data.tokenizer import eot_id, tokenizer_kind
from kiln.errors import KilnError

SHAKESPEARE = EMBEDDED["kiln:tinyshakespeare"].read_text(encoding="utf-8")
quiet = lambda *a: None  # noqa: E731


def run(tmp_path, name="out", **kw):
    kw.setdefault("val_fraction", 0.2)
    shard_tokens = kw.pop("shard_tokens", 100_000_000)
    return prepare(DataConfig(**kw), tmp_path / name, log=quiet, shard_tokens=shard_tokens), tmp_path / name


def all_tokens(folder, split):
    s = TokenShards(folder, split)
    return s.read(0, len(s))


def docs_corpus(n=60):
    return [f"Document {i}: the {['quick', 'lazy', 'brown'][i % 3]} fox number {i * 7} jumps.\nSecond line {i}."
            for i in range(n)]


# -------------------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_shakespeare_vocab_and_round_trip():
    tok = train_tokenizer("char", [SHAKESPEARE])
    chars = sorted(set(SHAKESPEARE))
    assert tok.get_vocab_size() == 65 and tok.get_vocab() == {c: i for i, c in enumerate(chars)}
    assert tok.token_to_id("\n") == 0 and tok.token_to_id(" ") == 1
    text = "First Citizen:\n  Before we proceed,\n\n hear me!\t"
    tok2 = train_tokenizer("char", [text])
    assert tok2.decode(tok2.encode(text).ids) == text
    assert tok.decode(tok.encode(SHAKESPEARE[:5000]).ids) == SHAKESPEARE[:5000]
    assert eot_id(tok) is None and tokenizer_kind(tok) == "char"


def test_embedded_corpus_matches_nanogpt_char_split(tmp_path):
    m, out = run(tmp_path, val_fraction=0.1)
    stoi = {c: i for i, c in enumerate(sorted(set(SHAKESPEARE)))}
    data = np.array([stoi[c] for c in SHAKESPEARE])
    n = len(data)
    assert m["vocab_size"] == 65 and m["dtype"] == "uint16" and m["eot_token_id"] is None
    assert np.array_equal(all_tokens(out, "train"), data[: int(n * 0.9)])
    assert np.array_equal(all_tokens(out, "val"), data[int(n * 0.9):])
    tok = load_tokenizer(out / "tokenizer.json")
    assert tok.decode(list(all_tokens(out, "val")[:200])) == SHAKESPEARE[int(n * 0.9):][:200]


def test_bpe_train_round_trip_and_prepare(tmp_path):
    text = SHAKESPEARE[:200_000]
    tok = train_tokenizer("bpe", [text], vocab_size=500)
    assert tok.get_vocab_size() == 500 and eot_id(tok) == tok.token_to_id("<|endoftext|>")
    sample = "ROMEO:\n  Wherefore art thou,   Romeo? — ünïcödé ✓\n\n"
    assert tok.decode(tok.encode(sample).ids) == sample
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    m, out = run(tmp_path, source=str(f), tokenizer="bpe", vocab_size=500)
    tok = load_tokenizer(out / "tokenizer.json")
    train, val = all_tokens(out, "train"), all_tokens(out, "val")
    assert tok.decode(list(train)) + tok.decode(list(val)) == text  # contiguous split at a line boundary
    assert tok.decode(list(train)).endswith("\n")
    assert abs(len(tok.decode(list(val))) / len(text) - 0.2) < 0.01
    assert m["tokenizer_kind"] == "bpe" and m["splits"]["train"]["tokens"] == len(train)


def test_every_tokenizer_kind_trains_to_the_same_file_in_every_process(tmp_path):
    """HF's WordPieceTrainer numbers its ## pieces in a per-process hash order (tokenizers#1794): without kiln's
    sorted registration two processes gave different ids (3 of 3 measured). Char and BPE for the same reason."""
    import subprocess
    import sys

    code = ("import sys; from kiln.data.tokenizer import train_tokenizer\n"
            "text = open(sys.argv[1], encoding='utf-8').read()[:200_000]\n"
            "for kind in ('wordpiece', 'bpe', 'char'):\n"
            "    train_tokenizer(kind, [text], 1200, lowercase=kind == 'wordpiece').save(f'{sys.argv[2]}/{kind}.json')")
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        subprocess.run([sys.executable, "-c", code, str(EMBEDDED["kiln:tinyshakespeare"]), str(tmp_path / run)], check=True)
    for kind in ("wordpiece", "bpe", "char"):
        assert (tmp_path / "a" / f"{kind}.json").read_bytes() == (tmp_path / "b" / f"{kind}.json").read_bytes(), kind
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "a" / "wordpiece.json"))  # the ## pieces are no special tokens
    assert [t.content for t in tok.get_added_tokens_decoder().values()] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                              "[MASK]"]
    ids = tok.encode("Wherefore art thou Romeo?").ids
    assert any(tok.id_to_token(i).startswith("##") for i in ids)
    assert tok.decode(ids, skip_special_tokens=True) == "wherefore art thou romeo?"


def test_wordpiece_and_existing_tokenizer_path(tmp_path):
    tok = train_tokenizer("wordpiece", docs_corpus(), vocab_size=200)
    for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        assert tok.token_to_id(special) is not None
    assert eot_id(tok) == tok.token_to_id("[SEP]")
    assert tok.decode(tok.encode("the quick fox jumps").ids) == "the quick fox jumps"
    path = tmp_path / "wp.json"
    tok.save(str(path))
    d = tmp_path / "docs"
    d.mkdir()
    for i, doc in enumerate(docs_corpus(20)):
        (d / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    m, out = run(tmp_path, source=str(d), tokenizer=str(path))
    assert m["tokenizer_kind"] == "wordpiece" and m["eot_token_id"] == tok.token_to_id("[SEP]")
    train = all_tokens(out, "train")
    assert (train == m["eot_token_id"]).sum() + (all_tokens(out, "val") == m["eot_token_id"]).sum() == 20


def test_lowercase_tokenizer_is_saved_with_its_normalizer(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(SHAKESPEARE[:50_000], encoding="utf-8")
    for kind in ("wordpiece", "bpe"):
        m, out = run(tmp_path, name=kind, source=str(f), tokenizer=kind, vocab_size=400, lowercase=True)
        tok = load_tokenizer(out / "tokenizer.json")  # what fine-tuning and generation load
        assert tok.encode("ROMEO: Good Night").ids == tok.encode("romeo: good night").ids, kind
        learned = [t for t in tok.get_vocab() if len(t) > 1 and not t.startswith(("[", "<|"))]  # merges, not bytes
        assert learned and not any(c in string.ascii_uppercase for t in learned for c in t), kind
    cased = train_tokenizer("wordpiece", [SHAKESPEARE[:50_000]], vocab_size=400)
    assert cased.encode("ROMEO").ids != cased.encode("romeo").ids
    for tokenizer in ("char", str(tmp_path / "bpe" / "tokenizer.json")):
        with pytest.raises(KilnError, match="data.lowercase applies to a bpe or wordpiece tokenizer"):
            run(tmp_path, name="never", source=str(f), tokenizer=tokenizer, lowercase=True)


# -------------------------------------------------------------------------------------- inputs


def test_jsonl_csv_tsv_folder_inputs_and_dedup(tmp_path):
    docs = docs_corpus(60)
    rows = docs + docs[:10]  # 10 exact duplicates
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(rows)) + "\n")
    for name, delim in (("d.csv", ","), ("d.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["id", "body"])
            w.writerows([i, t] for i, t in enumerate(rows))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, t in enumerate(rows):
        (folder / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    results = []
    for src in ("d.jsonl", "d.csv", "d.tsv", "folder"):
        m, out = run(tmp_path, name=f"out-{src}", source=str(tmp_path / src), text_field="body",
                     dedup=True, val_fraction=0.3)
        assert m["documents"] == 60 and m["duplicates_dropped"] == 10, src
        assert m["split"] == "hash" and m["splits"]["val"]["tokens"] > 0
        results.append((all_tokens(out, "train"), all_tokens(out, "val")))
        if src == "d.jsonl":  # char vocab: decoding gives the documents back in order, nothing else
            tok = load_tokenizer(out / "tokenizer.json")
            text = tok.decode(list(results[-1][0])) + tok.decode(list(results[-1][1]))
            assert sorted(text) == sorted("".join(docs))
    for train, val in results[1:]:  # same docs, same seed -> the same split whatever the format
        assert np.array_equal(train, results[0][0]) and np.array_equal(val, results[0][1])
    m, _ = run(tmp_path, name="nodedup", source=str(tmp_path / "d.jsonl"), text_field="body")
    assert m["documents"] == 70 and m["duplicates_dropped"] == 0


def test_cleaning():
    assert clean_text("a\r\nb\x00c\x1bd\te\u0085f") == "a\nbcd\tef"
    assert clean_text("\ufeffcafe\u0301") == "caf\u00e9"  # BOM dropped, NFC


def test_a_folder_of_books_gives_every_book_a_share_of_val(tmp_path):
    """Whole books as files: each long one is split piece by piece, so val is ~val_fraction of every book,
    not one whole book (and the small files are still hashed whole)."""
    folder = tmp_path / "books"
    folder.mkdir()
    for name, letter in (("a", "x"), ("b", "y")):  # two ~1.3 MB books, each of its own characters
        (folder / f"{name}.txt").write_text("".join(f"{letter * 60} {i}\n" for i in range(20_000)))
    for i in range(5):
        (folder / f"note{i}.txt").write_text(f"short note {i}\n")
    m, out = run(tmp_path, source=str(folder), tokenizer="char", val_fraction=0.2)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    train, val = tok.decode(list(all_tokens(out, "train"))), tok.decode(list(all_tokens(out, "val")))
    for letter in "xy":
        share = val.count(letter) / (val.count(letter) + train.count(letter))
        assert 0.08 < share < 0.35, (letter, share)  # ~20% of each book, in ~64 kB pieces


def test_tiny_multi_doc_corpus_still_gets_a_val_split(tmp_path):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "only one document here, long enough"}) + "\n")
    m, out = run(tmp_path, source=str(tmp_path / "one.jsonl"), val_fraction=0.2)
    assert m["splits"]["train"]["tokens"] > 0 and m["splits"]["val"]["tokens"] > 0


# -------------------------------------------------------------------------------------- shards


def test_uint32_for_large_vocab(tmp_path):
    vocab = {f"w{i}": i for i in range(70000)}
    vocab["[UNK]"] = 70000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    words = [f"w{i}" for i in (3, 65535, 65536, 69999, 12, 70001)]
    f = tmp_path / "big.txt"
    f.write_text("\n".join(" ".join(words) for _ in range(50)) + "\n")
    m, out = run(tmp_path, source=str(f), tokenizer=str(tmp_path / "big.json"))
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70001
    ids = np.concatenate([all_tokens(out, "train"), all_tokens(out, "val")])
    assert ids.dtype == np.int64 and ids.max() == 70000
    assert list(ids[:6]) == [3, 65535, 65536, 69999, 12, 70000]
    assert (out / "train_000.bin").stat().st_size == 4 * m["splits"]["train"]["tokens"]
    small, _ = run(tmp_path, name="small", source=str(f), tokenizer="char")
    assert small["dtype"] == "uint16"


def test_writer_rejects_overflow(tmp_path):
    w = ShardWriter(tmp_path, "train", "uint16")
    with pytest.raises(ValueError):
        w.append(np.array([1, 70000]))
    w.close()


def test_reader_crosses_shard_boundaries(tmp_path):
    m, out = run(tmp_path, val_fraction=0.1, shard_tokens=1000)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) == 1004 and all(s["tokens"] == 1000 for s in shards[:-1]) and shards[-1]["tokens"] == 854
    big, out_big = run(tmp_path, name="big", val_fraction=0.1)
    ref = all_tokens(out_big, "train")
    ds = TokenShards(out, "train")
    assert len(ds) == len(ref) == 1_003_854
    for start, length in ((0, 1000), (990, 25), (1999, 2002), (len(ref) - 1500, 1500), (123_456, 0)):
        assert np.array_equal(ds.read(start, length), ref[start:start + length])
    with pytest.raises(IndexError):
        ds.read(len(ref) - 5, 10)


def test_missing_or_bad_shards_and_manifest(tmp_path):
    _, out = run(tmp_path, val_fraction=0.1, shard_tokens=300_000)
    (out / "train_002.bin").unlink()
    with pytest.raises(KilnError, match="train_002.bin"):
        TokenShards(out, "train")
    with open(out / "val_000.bin", "ab") as f:
        f.write(b"xx")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(KilnError, match="manifest.json"):
        read_manifest(out)
    with pytest.raises(KilnError, match="manifest.json"):
        read_manifest(tmp_path / "nowhere")
    _, out2 = run(tmp_path, name="o2", val_fraction=0.1)
    with open(out2 / "val_000.bin", "ab") as f:
        f.write(b"xx")
    with pytest.raises(KilnError, match="val_000.bin"):
        read_manifest(out2)


def test_output_is_replaced_atomically(tmp_path):
    _, out = run(tmp_path, val_fraction=0.1)
    m, out = run(tmp_path, val_fraction=0.5)  # re-prepare over an existing dataset
    assert read_manifest(out)["val_fraction"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left
    (tmp_path / "bad.txt").write_bytes(b"\x00\x01")
    with pytest.raises(KilnError):
        run(tmp_path, source=str(tmp_path / "bad.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "out"]
    (tmp_path / "notdata").mkdir()
    (tmp_path / "notdata" / "x").write_text("x")
    with pytest.raises(KilnError, match="notdata"):
        run(tmp_path, name="notdata")


# -------------------------------------------------------------------------------------- bad inputs


def _bad(tmp_path, name, content, match, **kw):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content, encoding="utf-8")
    with pytest.raises(KilnError, match=match) as e:
        run(tmp_path, source=str(p), **kw)
    msg = str(e.value)
    assert "\n" not in msg and name in msg
    return msg


def test_bad_inputs_raise_one_line_errors_naming_the_file(tmp_path):
    _bad(tmp_path, "missing.txt", None, "not found")
    _bad(tmp_path, "empty.txt", "", "empty")
    _bad(tmp_path, "blank.txt", "\x01\x02\x03", "no text")
    _bad(tmp_path, "bin.txt", b"abc\x00def" * 100, "binary")
    msg = _bad(tmp_path, "latin.txt", "hello world\n".encode() * 10 + "café".encode("latin-1"), "UTF-8")
    assert "offset 123" in msg
    msg = _bad(tmp_path, "big_latin.txt", b"a" * 3_000_000 + b"\xff", "UTF-8")
    assert "offset 3000000" in msg
    msg = _bad(tmp_path, "rows.jsonl", '{"text": "ok"}\n{"text": "ok", \n', "not valid JSON")
    assert "rows.jsonl:2" in msg
    msg = _bad(tmp_path, "field.jsonl", '{"txt": "hi", "id": 1}\n', "no field 'text'")
    assert "field.jsonl:1" in msg and "did you mean 'txt'" in msg and "txt, id" in msg
    msg = _bad(tmp_path, "cols.csv", "id,body\n1,hello\n", "no column 'text'")
    assert "id, body" in msg
    _bad(tmp_path, "latin.csv", "id,text\n1,".encode() + "é".encode("latin-1"), "offset 10")
    (tmp_path / "emptydir").mkdir()
    _bad(tmp_path, "emptydir", None, "no .txt files")
    (tmp_path / "ok.txt").write_text("abc\n")
    run(tmp_path, name="out-ok", source=str(tmp_path / "ok.txt"))
    (tmp_path / "garbage.json").write_text("{}")
    for tokenizer, match in (("bep", "unknown tokenizer 'bep' .did you mean 'bpe'"),
                             (str(tmp_path / "nope.json"), "not found: .*nope.json"),
                             (str(tmp_path / "garbage.json"), "garbage.json: not a valid tokenizer")):
        with pytest.raises(KilnError, match=match):
            run(tmp_path, source=str(tmp_path / "ok.txt"), tokenizer=tokenizer)
    (tmp_path / "other.txt").write_text("xyz\n")
    with pytest.raises(KilnError, match="other.txt: character 'x'"):  # char tokenizer built on other text
        run(tmp_path, source=str(tmp_path / "other.txt"), tokenizer=str(tmp_path / "out-ok" / "tokenizer.json"))
    with pytest.raises(KilnError, match="did you mean 'kiln:tinyshakespeare'"):
        Corpus("kiln:tinyshakespear")
