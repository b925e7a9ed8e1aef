"""Benchmarks in `kiln eval` against lm-evaluation-harness, and the shipped instruction mixture's split.

The model: a small random Llama (transformers) with a byte-level BPE that adds a bos token the way Llama's
tokenizer does, imported with `kiln import hf` and exported back with `kiln export hf`; lm_eval runs its `hf`
model on the export with local task YAMLs over the same JSONL files (the layouts question/choices/answer, ARC's
and HellaSwag's). Every item's chosen index (by log-likelihood and by log-likelihood per character), its
log-likelihoods and acc / acc_norm must equal lm_eval's, in plain mode and with `--chat` (lm_eval's
apply_chat_template, the run's template exported beside the weights). Generative exact match is checked against
transformers' greedy generate on the exported folder.
"""

from __future__ import annotations

import json
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from conftest import ROOT, assert_user_error  # noqa: E402
from kiln.cli import main  # noqa: E402

ASSETS = ROOT / "src" / "kiln" / "assets"
BENCH, GEN, TRAIN = (ASSETS / f"instruct_{n}.jsonl" for n in ("benchmark", "generative", "train"))
SHARED = ROOT.parent / "shared" / "data"
pytestmark = pytest.mark.usefixtures("one_thread")


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ChatML with a default system turn, as SmolLM2's template writes one
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou answer questions.<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(kiln run, its `kiln export hf` folder, tmp folder)."""
    import torch
    import transformers
    from tokenizers import processors

    from kiln.data.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("bench")
    texts = [r["question"] + " " + " ".join(r["choices"]) for r in rows(BENCH)] + [r["question"] for r in rows(GEN)]
    tok = train_tokenizer("bpe", texts, vocab_size=1200)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    bos, eos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    src = tmp / "hf"
    src.mkdir()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}))
    (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=bos, eos_token_id=eos,
                                   initializer_range=0.3)  # wide weights: log-likelihoods far apart
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    run, exported = tmp / "run", tmp / "exported"
    assert main(["import", "hf", str(src), str(run)]) == 0
    assert main(["export", "hf", str(run), str(exported)]) == 0
    return run, exported, tmp


def arc_and_hellaswag(tmp, n: int = 100):
    """n benchmark items in ARC's layout and in HellaSwag's; the last one's question is longer than the
    model's context (both cut it from the left)."""
    arc, hs = tmp / "arc.jsonl", tmp / "hellaswag.jsonl"
    items = rows(BENCH)[:300:300 // n]
    items[-1] = {**items[-1], "question": " ".join([items[-1]["question"]] * 12)}
    arc.write_text("".join(json.dumps({"question": r["question"], "answerKey": "ABCD"[r["answer"]],
                                       "choices": {"text": r["choices"], "label": list("ABCD"[:len(r["choices"])])}})
                           + "\n" for r in items))
    hs.write_text("".join(json.dumps({"activity_label": r["kind"], "ctx_a": r["question"] + " [title] Answer",
                                      "ctx_b": "it is", "endings": r["choices"], "label": str(r["answer"])})
                          + "\n" for r in items))
    return arc, hs


TASK_YAML = {  # as lm_eval's own arc_easy and hellaswag tasks, over local files
    "kiln_mc": 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n',
    "kiln_arc": 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices.text}}"\n'
                'doc_to_target: "{{choices.label.index(answerKey)}}"\n',
    "kiln_hellaswag": 'process_docs: !function hs_utils.process_docs\ndoc_to_text: "{{query}}"\n'
                      'doc_to_choice: "choices"\ndoc_to_target: "{{label}}"\n',
    # kiln eval --chat asks the bare question as the user turn
    "kiln_chat": 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n',
}


def lm_eval_samples(exported, files: dict, tmp, chat: bool = False) -> dict:
    """{task: (results, samples in doc order)} of lm_eval's hf model on the exported folder (`files`: task ->
    its JSONL; `chat`: lm_eval's apply_chat_template)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = tmp / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "hs_utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    for name in files:
        body = TASK_YAML[name]
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {files[name]}\n"
            f"test_split: test\noutput_type: multiple_choice\n{body}"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={exported},dtype=float32", tasks=list(files),
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True, device="cpu",
                                  batch_size=16, apply_chat_template=chat)
    return {t: (out["results"][t], sorted(out["samples"][t], key=lambda s: s["doc_id"])) for t in files}


def assert_same(name: str, ours: tuple, theirs: tuple) -> None:
    """kiln's metrics and per-item rows equal lm_eval's results and samples, item by item."""
    import numpy as np

    metrics, items = ours
    results, samples = theirs
    assert len(items) == len(samples) == metrics["n"] and metrics["n"] >= 100
    for mine, s in zip(items, samples):
        lls = [ll for ll, _ in s["filtered_resps"]]
        assert mine["chosen"] == int(np.argmax(lls)), (name, s["doc_id"])
        assert mine["acc"] == s["acc"] and mine["acc_norm"] == s["acc_norm"], (name, s["doc_id"])
        assert mine["gold"] == s["target"], (name, s["doc_id"])
        assert np.allclose(mine["loglikelihoods"], lls, rtol=0, atol=1e-3), (name, s["doc_id"])
    assert metrics["acc"] == pytest.approx(results["acc,none"], abs=1e-12), name
    assert metrics["acc_norm"] == pytest.approx(results["acc_norm,none"], abs=1e-12), name
    assert sum(r["chosen"] != r["chosen_norm"] for r in items) > 0  # the two rules do differ on some items


def test_multiple_choice_equals_lm_eval_on_every_item(runs, capsys):
    run, exported, tmp = runs
    arc, hs = arc_and_hellaswag(tmp)
    files = {"kiln_mc": BENCH, "kiln_arc": arc, "kiln_hellaswag": hs}
    ours = {}
    for name, f in files.items():
        assert main(["eval", str(run), str(f), "--out", str(tmp / f"{name}.json")]) == 0
        ours[name] = (json.loads((tmp / f"{name}.json").read_text()), rows(tmp / f"{name}.items.jsonl"))
    assert [ours[n][0]["layout"] for n in files] == ["mc", "arc", "hellaswag"]
    assert [ours[n][0]["truncated"] for n in files] == [0, 1, 1]
    theirs = lm_eval_samples(exported, files, tmp)
    for name in files:
        assert_same(name, ours[name], theirs[name])
    assert set(ours["kiln_mc"][0]["per_kind"]) == {"sentiment", "translate", "source", "missing", "speaker"}
    assert "acc_norm" in capsys.readouterr().out


def test_chat_mode_equals_lm_eval_with_its_chat_template(runs):
    run, exported, tmp = runs
    sub = tmp / "chat.jsonl"  # every third item
    sub.write_text("".join(json.dumps(r) + "\n" for r in rows(BENCH)[::3]))
    assert main(["eval", str(run), str(sub), "--chat", "--out", str(tmp / "chat.json")]) == 0
    ours = (json.loads((tmp / "chat.json").read_text()), rows(tmp / "chat.items.jsonl"))
    assert ours[0]["chat"] is True
    theirs = lm_eval_samples(exported, {"kiln_chat": sub}, tmp, chat=True)["kiln_chat"]
    assert theirs[1][0]["arguments"][0][0].startswith("<|im_start|>system\nYou answer questions.")
    assert_same("kiln_chat", ours, theirs)


def test_generative_exact_match_equals_transformers_greedy(runs):
    import torch
    import transformers

    run, exported, tmp = runs
    sub = tmp / "gen.jsonl"
    sub.write_text("".join(json.dumps(r) + "\n" for r in rows(GEN)[::6]))
    assert main(["eval", str(run), str(sub), "--max-new-tokens", "6", "--out", str(tmp / "gen.json")]) == 0
    metrics, items = json.loads((tmp / "gen.json").read_text()), rows(tmp / "gen.items.jsonl")
    assert metrics["layout"] == "generative" and metrics["n"] == len(items) == 20
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    for r, mine in zip(rows(sub), items):
        ids = tok(f"Question: {r['question']}\nAnswer:", return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
        assert mine["reply"] == reply
        assert mine["exact_match"] == float(reply in r["answer"])
    assert metrics["exact_match"] == sum(r["exact_match"] for r in items) / 20


def test_bad_benchmark_lines_are_one_line_and_write_nothing(runs, capsys, tmp_path):
    run = runs[0]
    good = {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1}
    swag = {"ctx": "A man", "endings": ["a", "b"], "label": 0}
    cases = [(good, {**good, "answer": 2}, "answer 2 is out of range for 2 choices"),
             (good, {**good, "choices": []}, "no choices"),
             (swag, {**swag, "label": 5}, "label 5 is out of range"),
             (good, {"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}, "answerKey 'B'"),
             (good, {"question": "q", "answer": "a"}, "not a mc row"),
             (good, {**good, "choices": ["3", " ".join(["four"] * 300)]}, "longer than the model's context")]
    for i, (first, bad, needle) in enumerate(cases):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text(json.dumps(first) + "\n" + json.dumps(bad) + "\n")
        out = tmp_path / f"out{i}" / "m.json"
        assert_user_error(capsys, ["eval", run, f, "--benchmark", "--out", out], f"bad{i}.jsonl:2", needle)
        assert not out.parent.exists()


def test_a_run_that_is_not_a_decoder_is_refused(tmp_path, capsys):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=32)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    assert main(["import", "hf", str(tmp_path / "bert"), str(tmp_path / "run")]) == 0
    capsys.readouterr()
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    assert_user_error(capsys, ["eval", tmp_path / "run", f], "scored by a decoder", "encoder")
    assert not (tmp_path / "run" / "eval").exists()


def test_held_out_phrasings_and_items_are_never_trained_on():
    from kiln.data.instruct_mix import TEMPLATES, TRAIN_PHRASINGS

    train = "\n".join(m["content"] for r in rows(TRAIN) for m in r["messages"])
    bench, gen = rows(BENCH), rows(GEN)
    assert len(rows(TRAIN)) <= 2000 and len(bench) <= 400
    assert sum(p.stat().st_size for p in (TRAIN, BENCH, GEN)) < 1_000_000
    for kind, phrasings in TEMPLATES.items():
        for t in phrasings[TRAIN_PHRASINGS:]:  # each held-out phrasing's fixed words are in no training turn
            for piece in (p.strip() for p in t.split("{item}")):
                assert len(piece) < 12 or piece not in train, (kind, piece)
        for t in phrasings[:TRAIN_PHRASINGS]:
            assert any(t.split("{item}")[0] in m["messages"][0]["content"] for m in rows(TRAIN) if m["kind"] == kind)
    for r in bench + gen:
        answer = r["choices"][r["answer"]] if "choices" in r else r["answer"][0]
        item = r["item"].replace("____", answer) if r["kind"] == "missing" else r["item"]
        assert item not in train, (r["kind"], item)  # nor the item asked about, in any phrasing
        for t in TEMPLATES[r["kind"]][:TRAIN_PHRASINGS]:  # and the question is asked in a held-out phrasing
            assert not re.fullmatch(re.escape(t).replace(re.escape("{item}"), ".*"), r["question"], re.S)
    assert {r["kind"] for r in bench} == set(TEMPLATES)


def test_the_shipped_mixture_is_what_the_generator_writes(tmp_path):
    from kiln.data.instruct_mix import main as build

    assert build(["--data", str(SHARED), "--out", str(tmp_path)]) == 0
    for f in (TRAIN, BENCH, GEN):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name
