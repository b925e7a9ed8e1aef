"""Labelled data built from real text by templates and rules (no QA or NER corpus is available offline).

QA (SQuAD v2.0 format) over tiny Shakespeare (src/kiln/assets/tinyshakespeare.txt): a context is a run of
consecutive speeches, verbatim; the questions are
    Who says "<words of one speech>"?              -> the speaker's name line of that speech
    What does <speaker> say after "<words>"?      -> the words that follow in that line
    Who says "<words from another passage>"?       -> unanswerable (is_impossible)
NER (CoNLL columns: token, shape, tag; IOB2) over Jane Austen's novels (../shared/data/austen.txt): PER for
character names from a list and for a title (Mr., Mrs., Miss, Lady, Sir, Colonel, Captain, Dr.) followed by
capitalised words, LOC for places from a list. Silver labels by rule: a name missing from the lists is O.

    .venv/bin/python tests/task_data.py    # writes tests/assets/squad_shakespeare.json, ner_austen.conll
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "src" / "kiln" / "assets" / "tinyshakespeare.txt"
AUSTEN = ROOT.parent / "shared" / "data" / "austen.txt"
ASSETS = ROOT / "tests" / "assets"


# ----------------------------------------------------------------------------------------------- QA


def speeches(text: str) -> list[tuple[int, int, str]]:
    """(start, end, speaker) of every speech block ("Name:\\nlines...") of the play text, in order."""
    out = []
    for m in re.finditer(r"(?m)^([A-Z][A-Za-z' ]+):\n((?:.+\n?)+)", text):
        out.append((m.start(), m.end(), m.group(1)))
    return out


def squad_shakespeare(n_contexts: int = 200, seed: int = 0, min_speeches: int = 3, max_speeches: int = 8,
                      start: int = 0, impossible: float = 0.2, long_every: int = 0, gap: int = 0) -> dict:
    """SQuAD v2.0 JSON: contexts of consecutive speeches (non-overlapping, from `start` speeches on, up to `gap`
    speeches skipped between two: contexts from all over the plays), ~2 questions each. long_every > 0: every
    such context is 3x longer (several windows)."""
    text = SHAKESPEARE.read_text()
    blocks = speeches(text)
    rng = random.Random(seed)
    paragraphs, i, k = [], start, 0
    while len(paragraphs) < n_contexts and i < len(blocks) - max_speeches * 3:
        n = rng.randint(min_speeches, max_speeches) * (3 if long_every and k % long_every == 0 else 1)
        group = blocks[i:i + n]
        i, k = i + n + (rng.randint(0, gap) if gap else 0), k + 1
        base = group[0][0]
        context = text[base:group[-1][1]].rstrip("\n")
        qas = []
        for j, (s, e, speaker) in enumerate(group):
            body_start = s + len(speaker) + 2 - base
            lines = [(m.start() + body_start, m.group()) for m in re.finditer(r".+", context[body_start:e - base])]
            if not lines or rng.random() < 0.4:
                continue
            who = rng.random() < 0.5  # half "who says", half "what follows"
            off, line = rng.choice(lines)
            words = list(re.finditer(r"\S+", line))
            after = 0 if who else 2  # words kept after the phrase (the answer comes from them)
            if len(words) < 3 + after:
                continue
            n = rng.randint(3, min(6, len(words) - after))
            w0 = rng.randint(0, len(words) - n - after)
            a, b = off + words[w0].start(), off + words[w0 + n - 1].end()
            phrase = context[a:b]
            if context.count(phrase) != 1:
                continue
            qid = f"s{seed}-{len(paragraphs)}-{len(qas)}"
            if who:
                qas.append({"id": qid, "question": f'Who says "{phrase}"?',
                            "answers": [{"text": speaker, "answer_start": s - base}], "is_impossible": False})
            else:
                rest = words[w0 + n:]
                n_words = rng.randint(1, min(3, len(rest)))
                ans_a, ans_b = off + rest[0].start(), off + rest[n_words - 1].end()
                qas.append({"id": qid, "question": f'What does {speaker} say after "{phrase}"?',
                            "answers": [{"text": context[ans_a:ans_b], "answer_start": ans_a}],
                            "is_impossible": False})
        paragraphs.append({"context": context, "qas": qas})
    # unanswerable: a phrase of another context, asked where it does not occur
    for p, par in enumerate(paragraphs):
        other = paragraphs[(p + 7) % len(paragraphs)]
        for q in other["qas"]:
            if q["question"].startswith("Who says") and rng.random() < impossible * 2:
                phrase = q["question"][len('Who says "'):-2]
                if phrase not in par["context"]:
                    par["qas"].append({"id": f"{q['id']}-x{p}", "question": q["question"], "answers": [],
                                       "is_impossible": True})
                break
    paragraphs = [p for p in paragraphs if p["qas"]]
    return {"version": "v2.0", "data": [{"title": "tinyshakespeare", "paragraphs": paragraphs}]}


def qa_baselines(examples) -> dict:
    """SQuAD EM/F1 of answers that read no question: the context's first sentence, the whole context (the
    longest span), the first speaker name of the context, and no answer at all."""
    from kiln.eval.qa import squad_scores

    rules = {"first_sentence": lambda c: re.split(r"(?<=[.!?])\s", c, maxsplit=1)[0],
             "whole_context": lambda c: c,
             "first_speaker": lambda c: c.split(":", 1)[0],
             "no_answer": lambda c: ""}
    return {name: squad_scores({e.id: rule(e.context) for e in examples}, examples) for name, rule in rules.items()}


# ----------------------------------------------------------------------------------------------- NER

TITLES = {"Mr.", "Mrs.", "Mr", "Mrs", "Miss", "Lady", "Sir", "Colonel", "Captain", "Dr."}
NAMES = set("""Emma Woodhouse Harriet Smith Knightley Elton Weston Frank Churchill Jane Fairfax Bates Martin Taylor
Isabella John Perry Dixon Cole Campbell Goddard Hawkins Augusta Elizabeth Eliza Lizzy Darcy Bingley Bennet Lydia
Kitty Mary Wickham Collins Charlotte Lucas Catherine Bourgh Georgiana Gardiner Fitzwilliam Hurst Caroline Phillips
Denny Forster Anne Elliot Wentworth Walter Musgrove Louisa Henrietta Charles Russell Benwick Harville Croft Shepherd
Clay Fanny Price Edmund Bertram Crawford Henry Tom Julia Maria Norris Rushworth Yates Grant William Susan Thomas
Elinor Marianne Dashwood Willoughby Brandon Ferrars Edward Lucy Steele Jennings Palmer Middleton Margaret Robert
Morland Tilney Eleanor Thorpe Allen James Frederick""".split())
PLACES = set("""London Bath Highbury Hartfield Randalls Donwell Enscombe Richmond Weymouth Ireland Yorkshire Surry
Longbourn Netherfield Pemberley Meryton Rosings Hunsford Derbyshire Brighton Hertfordshire Kent Lambton Scotland
Kellynch Uppercross Lyme Somersetshire Mansfield Portsmouth Sotherton Antigua Northamptonshire Norland Barton
Delaford Cleveland Devonshire Sussex Northanger Fullerton Woodston Oxford England""".split())
PLACE_TAILS = {"Park", "Abbey", "Hill", "Grove", "Hall", "Lodge", "Cottage", "Place", "Street", "Buildings"}
TOKEN = re.compile(r"Mrs?\.|Dr\.|St\.|[A-Za-z]+(?:'[a-z]+)?|\d+|[^\sA-Za-z\d]")


def tag_tokens(tokens: list[str]) -> list[str]:
    tags, i = ["O"] * len(tokens), 0
    cap = lambda t: t[:1].isupper() and t.isalpha() and t not in TITLES and t != "I"  # noqa: E731
    while i < len(tokens):
        t = tokens[i]
        if t in TITLES and i + 1 < len(tokens) and cap(tokens[i + 1]):
            j = i + 1
            while j < len(tokens) and (cap(tokens[j]) or (tokens[j] == "de" and j + 1 < len(tokens)
                                                          and cap(tokens[j + 1]))):
                j += 1
            kind = "PER"
        elif t in NAMES:
            j, kind = i + 1, "PER"
            while j < len(tokens) and tokens[j] in NAMES:
                j += 1
        elif t in PLACES or (cap(t) and i + 1 < len(tokens) and tokens[i + 1] in PLACE_TAILS and t not in NAMES
                             and i > 0 and tokens[i - 1] not in TITLES and tokens[i - 1][:1].islower()):
            j, kind = i + 1, "LOC"
            while j < len(tokens) and tokens[j] in PLACE_TAILS:
                j += 1
        else:
            i += 1
            continue
        tags[i:j] = [f"B-{kind}"] + [f"I-{kind}"] * (j - i - 1)
        i = j
    return tags


def shape(t: str) -> str:
    return "p" if not t[0].isalnum() else "d" if t.isdigit() else "Xx" if t[0].isupper() else "x"


def austen_sentences(n: int = 1200, seed: int = 0, text: str | None = None) -> list[tuple[list[str], list[str]]]:
    """n (tokens, IOB2 tags) sentences of 6..45 tokens, ~3/4 of them with an entity."""
    text = (text if text is not None else AUSTEN.read_text()).replace("_", "")
    sents = []
    for par in re.split(r"\n\s*\n", text):
        tokens = TOKEN.findall(" ".join(par.split()))
        cur = []
        for t in tokens:
            cur.append(t)
            if t in ".!?":
                if 6 <= len(cur) <= 45:
                    sents.append(cur)
                cur = []
    rng = random.Random(seed)
    rng.shuffle(sents)
    with_ent, without = [], []
    for s in sents:
        tags = tag_tokens(s)
        (with_ent if any(t != "O" for t in tags) else without).append((s, tags))
    n_with = min(len(with_ent), n * 3 // 4)
    return with_ent[:n_with] + without[:n - n_with]


def write_conll(path: Path, sentences, docstart: bool = True) -> Path:
    lines = ["-DOCSTART- -X- O", ""] if docstart else []
    for tokens, tags in sentences:
        lines += [f"{t} {shape(t)} {g}" for t, g in zip(tokens, tags)] + [""]
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------------------------- backbones


def save_backbone(path: Path, tok, cfg) -> Path:
    """A kiln run folder at `path` (made here) holding `tok` and a `cfg` model drawn with seed 0, checkpointed at
    step 0: a backbone for `--init`."""
    import torch

    from kiln.config import RunConfig, dump_yaml
    from kiln.model.transformer import Transformer
    from kiln.run.checkpoint import save_checkpoint

    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    (path / "config.yaml").write_text(dump_yaml(RunConfig(out=str(path), model=cfg)))
    save_checkpoint(path, Transformer(cfg), 0)
    return path


def make_backbone(path: Path, text: str, context_length: int = 128, vocab_size: int = 1500, n_layer: int = 2) -> Path:
    """A tiny post-LN encoder run folder (BERT-shaped, so it exports to HF) with kiln's lowercasing WordPiece
    tokenizer trained on `text` (the same in every process) and BERT's [CLS] A [SEP] B [SEP] pair template."""
    from kiln.data.tokenizer import train_tokenizer
    from kiln.model.config import ModelConfig

    tok = train_tokenizer("wordpiece", [text], vocab_size, lowercase=True)
    cfg = ModelConfig(arch="encoder", vocab_size=tok.get_vocab_size(), n_layer=n_layer, n_head=2, d_model=32,
                      context_length=context_length, pre_norm=False, final_norm=False, embedding_norm=True,
                      type_vocab_size=2, pad_token_id=0, norm_eps=1e-12)
    return save_backbone(path, tok, cfg)


def baselines_of_run(run_dir: str) -> dict:
    """qa_baselines on the test split of a `kiln finetune qa` run (its data file, split and seed)."""
    from kiln.config import load_config
    from kiln.data.squad import QAConfig, read_squad, split_by_context

    cfg = load_config(Path(run_dir) / "qa.yaml", cls=QAConfig)
    rows, _ = read_squad(cfg.data.test or cfg.data.train)
    if not cfg.data.test:
        seed = cfg.seed if cfg.data.split_seed < 0 else cfg.data.split_seed
        rows = split_by_context(rows, 0.0 if cfg.data.val else cfg.data.val_fraction, cfg.data.test_fraction, seed)[2]
    return qa_baselines(rows)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["baselines"]:  # python tests/task_data.py baselines RUN_DIR
        for name, s in baselines_of_run(sys.argv[2]).items():
            print(f"{name:>15}: exact match {s['exact_match']:.2f}, F1 {s['f1']:.2f} ({s['n']} questions)")
        raise SystemExit(0)
    (ASSETS / "squad_shakespeare.json").write_text(json.dumps(squad_shakespeare(1000, seed=0, min_speeches=2, max_speeches=3, long_every=10, gap=4)))
    sents = austen_sentences(1500)
    random.Random(1).shuffle(sents)
    write_conll(ASSETS / "ner_austen.conll", sents)
    print("wrote", ASSETS / "squad_shakespeare.json", ASSETS / "ner_austen.conll")
