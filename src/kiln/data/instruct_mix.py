"""An instruction mixture and its held-out benchmarks, built from public-domain and openly licensed text.

    python -m kiln.data.instruct_mix --data ../shared/data --out src/kiln/assets

Five instruction kinds, each phrased six ways: the first four phrasings are for training, the last two are
held out (the benchmarks ask only in them):

  sentiment   is a movie review fresh or rotten (rotten_tomatoes.csv)
  translate   English -> Spanish of a Bible verse (bible_en_es.tsv: World English Bible / Reina-Valera 1909)
  source      whether a line is Shakespeare's or Jane Austen's (tinyshakespeare.txt, austen.txt)
  missing     which word was blanked out of a line (the same two texts)
  speaker     who speaks a line in a short Shakespeare scene

Items are split before anything is phrased: reviews and verses by a seeded shuffle of the distinct texts, the
two books by position (the last 15% of each feeds the benchmarks), and a held-out item whose text occurs in the
training part is dropped; so no benchmark question is asked, in any phrasing, about a text trained on.

Writes instruct_train.jsonl (OpenAI `messages`: a user turn, the assistant's answer; `kind`),
instruct_benchmark.jsonl (question / choices / answer index, `kind`, `item`: the text asked about) and
instruct_generative.jsonl (question / answer, the kinds with a one- or two-word answer). The same seed gives the
same bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path

SEED = 0
HELD_OUT = 0.15  # of each book, its last part
SHAKESPEARE, AUSTEN = "Shakespeare", "Jane Austen"

# {item} is the text asked about; the first TRAIN_PHRASINGS of each kind are trained on, the rest held out
TEMPLATES = {
    "sentiment": [
        "Is this movie review fresh or rotten?\n\n{item}",
        "Classify the sentiment of the review as fresh or rotten.\nReview: {item}",
        "Review: {item}\nWas the critic's verdict fresh or rotten?",
        "Read the film review below and answer with one word, fresh or rotten.\n{item}",
        "A critic wrote: \"{item}\" Did the critic rate the movie fresh or rotten?",
        "Decide whether this critique is positive (fresh) or negative (rotten): {item}",
    ],
    "translate": [
        "Translate into Spanish: {item}",
        "Translate this English verse to Spanish.\n{item}",
        "English: {item}\nSpanish:",
        "How would you say this in Spanish? {item}",
        "Give the Spanish version of the following sentence: {item}",
        "Render in Spanish, please:\n\n{item}",
    ],
    "source": [
        "Who wrote this line, Shakespeare or Jane Austen?\n{item}",
        "Line: {item}\nIs it from Shakespeare or from Jane Austen?",
        "Is the following text by Shakespeare or by Jane Austen? {item}",
        "Tell me the author of this passage (Shakespeare or Jane Austen): {item}",
        "\"{item}\" Which writer does this come from: Shakespeare or Jane Austen?",
        "Attribute the quotation to its author, Shakespeare or Jane Austen.\n\n{item}",
    ],
    "missing": [
        "Which word is missing where the blank is?\n{item}",
        "Fill in the blank with one word: {item}",
        "One word was removed from this line and replaced by ____. What is it?\n{item}",
        "Complete the line with the missing word.\n{item}",
        "Supply the single word that belongs in the gap: {item}",
        "{item}\nWhat word has been left out of the sentence above?",
    ],
    "speaker": [
        "Read the scene and say who speaks the quoted line.\n\n{item}",
        "{item}\n\nWhich character says the quoted line?",
        "In this passage, name the character who says the quoted line.\n{item}",
        "Scene:\n{item}\n\nWho is the speaker of the quoted line?",
        "Identify the speaker of the quoted words in the excerpt below.\n\n{item}",
        "Here is an excerpt from a play.\n{item}\nTell me which character utters the quoted line.",
    ],
}
TRAIN_PHRASINGS = 4
# items per kind: training conversations, benchmark (multiple choice), generative
SIZES = {"train": 280, "benchmark": 60, "generative": 30}
GENERATIVE_KINDS = ("sentiment", "source", "missing", "speaker")


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("_", "")).strip()


def reviews(data: Path, rng: random.Random) -> list[tuple[str, str]]:
    """(review, fresh|rotten) of the distinct reviews of 40..200 characters, shuffled."""
    seen, out = set(), []
    with (data / "rotten_tomatoes.csv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = _clean(row["text"])
            if 40 <= len(text) <= 200 and text not in seen and row["label"] in ("fresh", "rotten"):
                seen.add(text)
                out.append((text, row["label"]))
    rng.shuffle(out)
    return out


def verses(data: Path, rng: random.Random) -> list[tuple[str, str]]:
    """(English, Spanish) of the short verses, distinct in both languages, shuffled."""
    seen, out = set(), []
    with (data / "bible_en_es.tsv").open(encoding="utf-8") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                continue
            en, es = _clean(parts[1]), _clean(parts[2])
            if 25 <= len(en) <= 90 and 20 <= len(es) <= 110 and en not in seen and es not in seen:
                seen.update((en, es))
                out.append((en, es))
    rng.shuffle(out)
    return out


def shakespeare_speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of each speech, in order."""
    out = []
    for block in text.split("\n\n"):
        lines = [ln.strip() for ln in block.strip().split("\n")]
        if len(lines) >= 2 and lines[0].endswith(":") and 1 < len(lines[0]) < 30:
            out.append((lines[0][:-1], [ln for ln in lines[1:] if ln]))
    return out


def shakespeare_lines(speeches) -> list[str]:
    """Lines of 40..160 characters: a verse line, or two joined."""
    out = []
    for _, lines in speeches:
        for i in range(0, len(lines) - 1, 2):
            pair = _clean(lines[i] + " " + lines[i + 1])
            one = _clean(lines[i])
            out.append(pair if len(one) < 40 else one)
    return [s for s in out if 40 <= len(s) <= 160]


def austen_sentences(text: str) -> list[str]:
    """Sentences of 40..160 characters from the novels' paragraphs (headings and quotations marks dropped)."""
    out = []
    for para in text.split("\n\n"):
        para = _clean(para)
        if not para or para.isupper() or para.upper().startswith("CHAPTER"):
            continue
        for s in re.split(r"(?<!Mr\.)(?<!Mrs\.)(?<!Dr\.)(?<!St\.)(?<=[.!?])\s+", para.replace('"', "")):
            if 40 <= len(s) <= 160 and s[0].isupper():
                out.append(s)
    return out


def blank_word(line: str, rng: random.Random) -> tuple[str, str] | None:
    """(the line with one word of 5+ lower-case letters replaced by ____, that word), or None."""
    words = line.split(" ")
    spots = [i for i, w in enumerate(words) if i and re.fullmatch(r"[a-z]{5,}", w.strip(",.;:!?'"))]
    if not spots:
        return None
    i = rng.choice(spots)
    word = words[i].strip(",.;:!?'")
    words[i] = words[i].replace(word, "____", 1)
    return " ".join(words), word


def _fact(kind: str, item: str, answer: str, choices: list[str] | None = None) -> dict:
    return {"kind": kind, "item": item, "answer": answer, "choices": choices or []}


def _distractors(rng: random.Random, pool: list[str], gold: str, n: int, avoid: str = "") -> list[str]:
    """gold and n others from pool (distinct, none in `avoid`), in a seeded order."""
    others: list[str] = []
    while len(others) < n:
        x = rng.choice(pool)
        if x != gold and x not in others and x not in avoid:
            others.append(x)
    choices = [gold] + others
    rng.shuffle(choices)
    return choices


def book_facts(lines: list[str], authors: list[str], rng: random.Random, n: int, seen_in_training: str) -> dict:
    """source and missing-word facts from (line, author) pairs; a line found in `seen_in_training` is skipped."""
    out: dict = {"source": [], "missing": []}
    words = sorted({w for ln in lines for w in re.findall(r"\b[a-z]{5,}\b", ln)})
    per_author = {SHAKESPEARE: 0, AUSTEN: 0}  # as many lines of each
    for line, author in zip(lines, authors):
        if seen_in_training and line in seen_in_training:
            continue
        if per_author[author] < (n + 1) // 2 and rng.random() < 0.5:
            per_author[author] += 1
            out["source"].append(_fact("source", line, author, [SHAKESPEARE, AUSTEN]))
        elif len(out["missing"]) < n:
            blanked = blank_word(line, rng)
            if blanked:
                out["missing"].append(_fact("missing", blanked[0], blanked[1],
                                            _distractors(rng, words, blanked[1], 3, line)))
        if sum(per_author.values()) >= n and len(out["missing"]) >= n:
            break
    return out


def speaker_facts(speeches, rng: random.Random, n: int) -> list[dict]:
    """Three consecutive speeches (two lines each at most), one of their lines quoted: who says it."""
    names = sorted({s for s, _ in speeches})
    out, i = [], 0
    while len(out) < n and i + 3 <= len(speeches):
        window = speeches[i:i + 3]
        i += 3
        if len({s for s, _ in window}) < 2:
            continue
        passage = "\n\n".join(f"{s}:\n" + "\n".join(lines[:2]) for s, lines in window)
        if len(passage) > 420:
            continue
        who, lines = rng.choice(window)
        quoted = rng.choice(lines[:2])
        if len(quoted) < 15 or sum(quoted in ls[:2] for _, ls in window) > 1:
            continue
        item = f"{passage}\n\nQuoted line: \"{quoted}\""
        present = sorted({s for s, _ in window} - {who})
        choices = [who] + present + [x for x in rng.sample(names, 8) if x != who and x not in present]
        choices = choices[:4]
        rng.shuffle(choices)
        out.append(_fact("speaker", item, who, choices))
    return out


def facts(data: Path, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(training facts, held-out facts) of every kind, held-out items never in the training part."""
    rng = random.Random(seed)
    n_held = SIZES["benchmark"] + SIZES["generative"]
    n_train = SIZES["train"]
    train: list[dict] = []
    held: list[dict] = []
    revs = reviews(data, rng)
    fresh, rotten = ([r for r in revs if r[1] == y] for y in ("fresh", "rotten"))
    balanced = [r for pair in zip(fresh[:n_held // 2], rotten[:n_held // 2]) for r in pair]  # held out: half each
    held += [_fact("sentiment", t, y, ["fresh", "rotten"]) for t, y in balanced]
    kept = set(balanced)
    train += [_fact("sentiment", t, y) for t, y in revs if (t, y) not in kept][:n_train]
    vs = verses(data, rng)
    held_es = [es for _, es in vs[:SIZES["benchmark"]]]
    held += [_fact("translate", en, es, _distractors(rng, held_es, es, 3)) for en, es in vs[:SIZES["benchmark"]]]
    train += [_fact("translate", en, es) for en, es in vs[SIZES["benchmark"]:SIZES["benchmark"] + n_train]]
    plays = shakespeare_speeches((data / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    novels = (data / "austen.txt").read_text(encoding="utf-8")
    cut_p, cut_n = int(len(plays) * (1 - HELD_OUT)), int(len(novels) * (1 - HELD_OUT))
    seen = "\n".join(ln for _, lines in plays[:cut_p] for ln in lines) + "\n" + novels[:cut_n]
    for part, plays_part, novels_part, n, avoid in ((train, plays[:cut_p], novels[:cut_n], n_train, ""),
                                                     (held, plays[cut_p:], novels[cut_n:], n_held, _clean(seen))):
        lines = [(ln, SHAKESPEARE) for ln in shakespeare_lines(plays_part)] + \
                [(s, AUSTEN) for s in austen_sentences(novels_part)]
        rng.shuffle(lines)
        got = book_facts([ln for ln, _ in lines], [a for _, a in lines], rng, n, avoid)
        part += got["source"] + got["missing"]
        part += speaker_facts(plays_part, rng, n)
    return train, held


def phrase(fact: dict, template: str) -> str:
    return template.replace("{item}", fact["item"])


def build(data: Path, out: Path, seed: int = SEED) -> dict:
    """Write instruct_{train,benchmark,generative}.jsonl into `out`; returns their sizes."""
    rng = random.Random(seed + 1)
    train, held = facts(data, seed)
    conversations = []
    for f in train:
        question = phrase(f, rng.choice(TEMPLATES[f["kind"]][:TRAIN_PHRASINGS]))
        conversations.append({"messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": f["answer"]}], "kind": f["kind"]})
    rng.shuffle(conversations)
    bench, gen = [], []
    for kind in TEMPLATES:
        mine = [f for f in held if f["kind"] == kind]
        for f in mine[:SIZES["benchmark"]]:
            q = phrase(f, rng.choice(TEMPLATES[kind][TRAIN_PHRASINGS:]))
            bench.append({"question": q, "choices": f["choices"], "answer": f["choices"].index(f["answer"]),
                          "kind": kind, "item": f["item"]})
        if kind in GENERATIVE_KINDS:
            for f in mine[SIZES["benchmark"]:SIZES["benchmark"] + SIZES["generative"]]:
                answers = [f["answer"]] + (["Austen"] if f["answer"] == AUSTEN else [])
                gen.append({"question": phrase(f, rng.choice(TEMPLATES[kind][TRAIN_PHRASINGS:])),
                            "answer": answers, "kind": kind, "item": f["item"]})
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, rows in (("train", conversations), ("benchmark", bench), ("generative", gen)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / f"instruct_{name}.jsonl").write_text(text, encoding="utf-8")
        sizes[name] = {"rows": len(rows), "bytes": len(text.encode("utf-8"))}
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kiln.data.instruct_mix", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data", help="folder with the four source files")
    p.add_argument("--out", default="src/kiln/assets", help="folder to write the three .jsonl files")
    p.add_argument("--seed", type=int, default=SEED)
    a = p.parse_args(argv)
    for name, s in build(Path(a.data), Path(a.out), a.seed).items():
        print(f"instruct_{name}.jsonl: {s['rows']} rows, {s['bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
