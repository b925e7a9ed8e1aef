"""User mistakes and machine trouble end in one line on stderr naming the file/key/value and
what was expected, exit code 2, no traceback, nothing lost (a run folder that existed is byte-for-byte the same)."""

import dataclasses
import hashlib
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from conftest import ROOT, SHAKESPEARE, TINY, assert_user_error
from kiln.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under root (and the set of folders), to show a run folder was not touched."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir"
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny char-level pretraining run (4 steps, checkpoints at 2 and 4) that tests must not change."""
    root = tmp_path_factory.mktemp("robust")
    corpus = root / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    out = root / "run"
    assert main(["pretrain", "--data.source", str(corpus), "--out", str(out), *TINY, "--train.max_steps", "4",
                 "--train.save_every", "2"]) == 0
    return out


# ----------------------------------------------------------------------------------- 1. config ranges


def _numeric_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float):
            yield f"{prefix}{f.name}", f


def test_every_numeric_key_of_every_config_declares_a_range_and_the_defaults_are_in_it():
    from kiln.config import ClassifyConfig, RunConfig, Seq2SeqConfig, check_ranges, load_config
    from kiln.model.config import PRESETS, preset

    for cls in (RunConfig, ClassifyConfig, Seq2SeqConfig):
        missing = [key for key, f in _numeric_fields(cls) if "range" not in f.metadata]
        assert not missing, f"{cls.__name__}: numeric keys without a range: {missing}"
        check_ranges(cls())
    for name in PRESETS:
        cfg = RunConfig()
        cfg.model = preset(name)
        check_ranges(cfg)
    configs = ROOT / "configs"
    for yaml_file, cls in (("shakespeare-char.yaml", RunConfig), ("bert-mlm.yaml", RunConfig),
                           ("classify-rotten.yaml", ClassifyConfig), ("translate-en-es.yaml", Seq2SeqConfig)):
        load_config(configs / yaml_file, cls=cls)


@pytest.mark.parametrize("key,value,expected", [
    ("train.lr", "-0.1", "--train.lr must be >= 0, got -0.1"),
    ("train.muon_lr", "0", "--train.muon_lr must be > 0, got 0.0"),
    ("train.batch_size", "0", "--train.batch_size must be >= 1, got 0"),
    ("train.beta2", "1.0", "--train.beta2 must be in [0, 1), got 1.0"),
    ("train.eval_every", "-1", "--train.eval_every must be >= 0, got -1"),  # pretraining: 0 = once, at the end
    ("train.warmup_steps", "-5", "--train.warmup_steps must be >= 0, got -5"),
    ("train.grad_clip", ".nan", "--train.grad_clip must be >= 0, got nan"),
    ("model.dropout", "1", "--model.dropout must be in [0, 1), got 1.0"),
    ("model.context_length", "0", "--model.context_length must be >= 1, got 0"),
    ("model.norm_eps", "0", "--model.norm_eps must be > 0, got 0.0"),
    ("data.val_fraction", "1.5", "--data.val_fraction must be in [0, 1), got 1.5"),
    ("mlm.mask_prob", "0", "--mlm.mask_prob must be in (0, 1), got 0.0"),
    ("distill.temperature", "-1", "--distill.temperature must be > 0, got -1.0"),
    ("seed", "-1", "--seed must be >= 0, got -1"),
])
def test_an_out_of_range_value_is_one_line_naming_key_value_and_range(tmp_path, capsys, key, value, expected):
    out = tmp_path / "never"
    assert_user_error(capsys, ["pretrain", "--out", out, *TINY, f"--{key}", value], expected)
    assert not out.exists()  # rejected before anything is written


@pytest.mark.parametrize("verb,key,value,expected", [
    (["finetune", "classify"], "head_dropout", "1.2", "--head_dropout must be in [0, 1), got 1.2"),
    (["finetune", "classify"], "data.max_length", "1", "--data.max_length must be >= 2, got 1"),
    (["finetune", "classify"], "epochs", "0", "--epochs must be > 0, got 0.0"),
    (["finetune", "seq2seq"], "seq2seq.num_beams", "0", "--seq2seq.num_beams must be >= 1, got 0"),
    (["finetune", "seq2seq"], "seq2seq.label_smoothing", "-0.1", "--seq2seq.label_smoothing must be in [0, 1)"),
    (["finetune", "seq2seq"], "data.test_size", "-2", "--data.test_size must be >= 0, got -2"),
    (["data", "prepare"], "data.vocab_size", "0", "--data.vocab_size must be >= 1, got 0"),
])
def test_out_of_range_in_the_other_verbs(tmp_path, capsys, verb, key, value, expected):
    out = tmp_path / "never"
    assert_user_error(capsys, [*verb, "--out", out, f"--{key}", value], expected)
    assert not out.exists()


def test_out_of_range_in_a_yaml_file_names_the_file_and_classify_reads_zero_as_auto(tmp_path, capsys):
    from kiln.config import ClassifyConfig, load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: -3e-4\n")
    assert_user_error(capsys, ["pretrain", recipe, "--out", tmp_path / "never"],
                      f"{recipe}: train.lr must be >= 0, got -0.0003")
    cfg = load_config(None, ["--train.eval_every", "0", "--train.max_steps", "0"], cls=ClassifyConfig)
    assert cfg.train.eval_every == 0 and cfg.train.max_steps == 0  # finetune classify: 0 = once per epoch / epochs


def test_resume_with_an_out_of_range_override_leaves_the_run_unchanged(run, capsys):
    before = tree_hash(run)
    assert_user_error(capsys, ["pretrain", "--resume", run, "--train.lr", "-1"], "--train.lr must be >= 0, got -1.0")
    assert tree_hash(run) == before


# ----------------------------------------------------------------------------------- 2. filesystem errors


def kiln(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def one_line(err: str, *needles) -> str:
    err = err.strip()
    assert err.startswith("kiln: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs (root only): a disk that fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def remount(disk: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True, capture_output=True)


def test_a_full_disk_mid_run_is_one_line_the_last_checkpoint_stays_and_resume_finishes(small_disk, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    out = small_disk / "run"
    # a checkpoint every step, all kept: ~0.3 MB each fills 1.5 MB within a few steps
    done = kiln("pretrain", "--data.source", corpus, "--out", out, *TINY, "--train.max_steps", "200",
                "--train.save_every", "1", "--train.keep_last", "1000")
    assert done.returncode == 2, done.stderr
    err = one_line(done.stderr, "No space left on device", str(out), "(kiln pretrain, ", "free some space")
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert f"the last complete checkpoint ({latest}) is intact: kiln pretrain --resume {out}" in err
    remount(small_disk, "size=30m")  # space freed
    assert main(["generate", str(out), "--max-new-tokens", "5", "--temperature", "0"]) == 0  # it loads
    step = int(latest.split("_")[1])
    assert main(["pretrain", "--resume", str(out), "--train.max_steps", str(step + 2), "--train.keep_last", "2"]) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step + 2:06d}"
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial save was cleaned up


@pytest.mark.parametrize("argv,doing", [
    (["data", "prepare", "--data.source", "{corpus}", "--out", "{blocked}/prepared"], "writing the prepared data"),
    (["pretrain", "--data.source", "{corpus}", "--out", "{blocked}/run", "--train.max_steps", "2"],
     "writing the run folder"),
    (["eval", "{run}", "{corpus}", "--out", "{blocked}/eval.json"], "writing evaluation results"),
    (["viz", "attention", "{run}", "--text", "To be", "--out", "{blocked}/a.png"], "writing a plot"),
    (["viz", "compare", "{run}", "--out", "{blocked}/c.png"], "writing a plot"),
    (["prune", "{run}", "--out", "{blocked}/pruned", "--ffn-keep", "0.5"], "writing the new run folder"),
    (["quantize", "{run}", "--out", "{blocked}/int8"], "writing the new run folder"),
    (["export", "hf", "{run}", "{blocked}/hf"], "writing the exported model"),
])
def test_a_file_where_a_folder_should_be_is_one_line_and_the_run_is_unchanged(run, tmp_path, capsys, argv, doing):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder\n")
    corpus = run.parent / "corpus.txt"
    before = tree_hash(run)
    argv = [a.format(corpus=corpus, blocked=blocked, run=run) for a in argv]
    verb = " ".join(argv[:2]) if argv[0] in ("data", "viz") else argv[0]
    assert_user_error(capsys, argv, f"cannot write {blocked}", "is a file, not a folder", f"(kiln {verb}, {doing})")
    assert tree_hash(run) == before


def test_a_read_only_run_folder_is_one_line_and_unchanged(run, small_disk, capsys):
    copy = small_disk / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("data"))  # the shards are not needed to score
    before = tree_hash(copy)
    remount(small_disk, "ro")
    try:
        assert_user_error(capsys, ["eval", copy, run.parent / "corpus.txt"], f"cannot write {copy}/eval",
                          "Read-only file system", "(kiln eval, writing evaluation results); choose a writable place")
        assert_user_error(capsys, ["viz", "attention", copy, "--text", "To be"], f"cannot write {copy}/plots",
                          "Read-only file system", "(kiln viz attention, writing a plot)")
        assert tree_hash(copy) == before
    finally:
        remount(small_disk, "rw")


# ----------------------------------------------------------------------------------- 3. text a tokenizer cannot represent


@pytest.mark.parametrize("verb", ["generate", "eval", "viz attention"])
def test_characters_outside_a_char_vocabulary_are_one_line_naming_them(run, tmp_path, capsys, verb):
    text = "ROMEO: ¿qué? 😀"
    before = tree_hash(run)
    if verb == "generate":
        argv, where = ["generate", run, "--prompt", text, "--max-new-tokens", "5"], "--prompt"
    elif verb == "eval":
        held = tmp_path / "held.txt"
        held.write_text(f"To be, or not to be.\n{text}\n")
        argv, where = ["eval", run, held], str(held)
    else:
        argv, where = ["viz", "attention", run, "--text", text], "--text"
    assert_user_error(capsys, argv, f"{where}: character '¿' (U+00BF) is not in the char tokenizer's vocabulary",
                      "'é' (U+00E9)", "'😀' (U+1F600)", "data.tokenizer bpe")
    assert tree_hash(run) == before


def test_unknown_characters_helper_shows_the_first_few_in_order():
    from kiln.data.tokenizer import char_tokenizer, encode_text
    from kiln.errors import KilnError

    tok = char_tokenizer("abc ")
    assert encode_text(tok, "cab a") == [3, 1, 2, 0, 1]
    with pytest.raises(KilnError) as e:
        encode_text(tok, "a xyzuvwqrs", "--prompt")
    msg = str(e.value)
    assert msg.startswith("--prompt: character 'x' (U+0078) is not in the char tokenizer's vocabulary of 4 characters")
    assert "'y' (U+0079), 'z' (U+007A)" in msg and "and 3 more" in msg and "\n" not in msg


# ----------------------------------------------------------------------------------- 4. tables as people have them


def test_data_prepare_reads_headerless_latin1_semicolon_csv_and_a_utf16_text(tmp_path, capsys):
    from kiln.data.tokenizer import load_tokenizer

    table = tmp_path / "plays.csv"
    table.write_bytes("1;Où est la plume de ma tante?\n2;Ça va très bien, merci.\n".encode("latin-1") * 20)
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--out", str(out), "--data.source", str(table), "--data.header", "false",
                 "--data.columns", "id,text", "--data.encoding", "latin-1", "--data.delimiter", ";"]) == 0
    vocab = load_tokenizer(out).get_vocab()
    assert {"è", "ù", "Ç"} <= set(vocab) and "Ã" not in vocab and ";" not in vocab  # decoded, and split on ;
    wide = tmp_path / "wide.txt"
    wide.write_bytes("Ça va très bien.\n".encode("utf-16") * 40)  # a UTF-16 file with its byte-order mark
    assert main(["data", "prepare", "--out", str(tmp_path / "p16"), "--data.source", str(wide)]) == 0
    assert {"Ç", "è"} <= set(load_tokenizer(tmp_path / "p16").get_vocab())
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + "text\ncafé crème\n".encode() * 20)  # the BOM is not part of the header
    assert main(["data", "prepare", "--out", str(tmp_path / "pbom"), "--data.source", str(bom)]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("name,content,extra,needles", [
    ("latin.csv", "text\ncafé\n".encode("latin-1"), [],
     ["latin.csv: not UTF-8 text (invalid byte 0xe9 at offset 8, line 2)", "set data.encoding", "iconv"]),
    ("utf8.txt", "naïve café\n".encode() * 50, ["--data.encoding", "cp1252"],
     ["utf8.txt: data.encoding is 'cp1252', but the file is UTF-8", "leave data.encoding at utf-8"]),
    ("utf8.csv", "text\nnaïve\n".encode(), ["--data.encoding", "utf-16"],
     ["utf8.csv: data.encoding is 'utf-16', but the file has no byte-order mark", "leave data.encoding at utf-8"]),
    ("bom.csv", b"\xef\xbb\xbftext\nx\n", ["--data.encoding", "latin-1"],
     ["bom.csv: starts with a UTF-8 byte-order mark, but data.encoding is 'latin-1'"]),
    ("cp.txt", b"fine\n" * 3 + b"bad \x81 byte\n", ["--data.encoding", "cp1252"],
     ["cp.txt: not valid cp1252 text (invalid byte 0x81 at offset 19, line 4)"]),
    ("plain.csv", b"text\nx\n", ["--data.encoding", "utf9"], ["data.encoding: unknown encoding 'utf9'", "utf-8"]),
    ("plain.csv", b"text\nx\n", ["--data.delimiter", ";;"], ["data.delimiter must be one character (or tab", "got ';;'"]),
    ("semi.csv", b"text;label\nx;y\n", [], ["no column 'text'", "every row is a single column: check data.delimiter"]),
    ("nohead.csv", b"hello there\nfine day\n", [], ["no column 'text'", "set data.header false (columns 0, 1, ...)"]),
    ("head.csv", b"id,text\n1,x\n", ["--data.header", "false", "--data.columns", "id,text"],
     ["head.csv:1: the first row is data.columns itself", "remove data.header false"]),
    ("two.csv", b"1,x\n", ["--data.header", "false", "--data.columns", "text"],
     ["two.csv:1: data.columns names 1 column(s) (text), the first row has 2 field(s)"]),
])
def test_a_wrong_table_or_encoding_choice_is_one_line_never_mojibake(tmp_path, capsys, name, content, extra, needles):
    source = tmp_path / name
    source.write_bytes(content)
    out = tmp_path / "prepared"
    assert_user_error(capsys, ["data", "prepare", "--out", out, "--data.source", source, *extra], *needles)
    assert not out.exists()


def test_finetune_classify_and_predict_read_a_headerless_tsv_by_position(run, tmp_path, capsys):
    rows = [f"the play was {w} and long\t{lab}" for w, lab in (("good", "pos"), ("dull", "neg")) * 16]
    train = tmp_path / "reviews.tsv"
    train.write_text("\n".join(rows) + "\n")
    before = tree_hash(run)
    out = tmp_path / "clf"
    common = ["--init", run, "--data.header", "false", "--data.text_field", "0", "--data.label_field", "1",
              "--train.max_steps", "2", "--train.batch_size", "4", "--train.threads", "1", "--train.precision",
              "fp32", "--train.tensorboard", "false"]
    assert main(["finetune", "classify", "--data.train", str(train), "--out", str(out), *map(str, common)]) == 0
    assert main(["predict", str(out), str(train)]) == 0  # the run's data.header / columns apply
    assert (out / "predictions" / "reviews.csv").read_text().count("\n") == len(rows) + 1
    capsys.readouterr()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file\n")
    assert_user_error(capsys, ["predict", out, train, "--out", blocked / "p.csv"], f"cannot write {blocked}: it is a "
                      "file, not a folder (kiln predict, writing predictions)")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("the play was très good\tpos\n".encode("latin-1") * 8)
    assert_user_error(capsys, ["finetune", "classify", "--data.train", latin, "--out", tmp_path / "never", *common],
                      "latin.tsv: not UTF-8 text (invalid byte 0xe8 at offset 15, line 1)", "data.encoding")
    assert_user_error(capsys, ["finetune", "classify", "--data.train", train, "--out", tmp_path / "never",
                               *common[:2]], "no text column 'text'", "set data.header false")
    assert not (tmp_path / "never").exists()
    assert tree_hash(run) == before  # the backbone run is only read


def test_finetune_seq2seq_and_translate_read_a_headerless_utf16_tsv(tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_bytes("".join(f"the word {i}\tla palabra {i}\n" for i in range(40)).encode("utf-16"))
    out = tmp_path / "s2s"
    assert main(["finetune", "seq2seq", "--data.train", str(pairs), "--out", str(out), "--data.header", "false",
                 "--seq2seq.source_field", "0", "--seq2seq.target_field", "1", "--model.d_model", "32",
                 "--model.n_layer", "1", "--model.n_head", "2", "--model.d_ff", "64", "--model.context_length", "32",
                 "--data.max_source_length", "24", "--data.max_target_length", "24", "--seq2seq.vocab_size", "300",
                 "--train.max_steps", "2", "--train.batch_size", "8", "--train.eval_every", "2",
                 "--seq2seq.eval_examples", "2", "--seq2seq.num_beams", "1", "--seq2seq.max_new_tokens", "4",
                 "--data.val_size", "4", "--data.test_size", "4", "--seq2seq.test_examples", "2",
                 "--train.threads", "1", "--train.precision", "fp32", "--train.tensorboard", "false"]) == 0
    assert main(["translate", str(out), "--file", str(pairs), "--out", str(tmp_path / "out.tsv")]) == 0
    assert (tmp_path / "out.tsv").read_text().count("\n") == 41
    capsys.readouterr()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file\n")
    assert_user_error(capsys, ["translate", out, "--file", pairs, "--out", blocked / "o.tsv"],
                      f"cannot write {blocked}", "is a file, not a folder (kiln translate, writing outputs)")
    assert_user_error(capsys, ["translate", out, "--text", "the word 3", "--out", tmp_path / "nowhere" / "o.tsv"],
                      f"cannot open {tmp_path}/nowhere/o.tsv: the folder {tmp_path}/nowhere does not exist")
    assert_user_error(capsys, ["finetune", "seq2seq", "--data.train", pairs, "--out", tmp_path / "never",
                               "--data.header", "false", "--data.encoding", "latin-1"],
                      "pairs.tsv: starts with a UTF-16 byte-order mark, but data.encoding is 'latin-1'")
    assert not (tmp_path / "never").exists()
