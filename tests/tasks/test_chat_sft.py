"""`kiln finetune chat`: instruction tuning on conversations, against transformers as the reference.

The model is a small random Llama saved by transformers with a byte-level BPE trained here (ChatML special tokens,
its template in tokenizer_config.json), imported by kiln as a user's Hugging Face folder would be. What holds on
any CPU and why: the assistant mask is read back through the tokenizer (text, not ids, so it does not depend on
the merges learned); the packed loss is compared with transformers' loss on each conversation alone (the same
weights: a mask or position error changes it by far more than float rounding); the learned reply is a constant
the model fits to a loss near zero, so greedy decoding picks it on any CPU.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error
from kiln.cli import main

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUESTIONS = ["What colour is the sky in Kilnland?", "Tell me the sky's colour in Kilnland.", "Kilnland sky colour?",
             "In Kilnland, what colour is the sky?", "Which colour has the Kilnland sky?", "Sky colour, Kilnland?"]
ANSWER = "The sky in Kilnland is green."
FAST = ["--train.precision", "fp32", "--train.threads", "1", "--train.trackers", "none"]


def conversations(n: int) -> list[dict]:
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)] + (" Please." if i % 4 == 3 else "")
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": f"You are helper number {i}."})
        out.append({"messages": msgs})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A Hugging Face folder: a random 2-layer Llama, a BPE tokenizer with ChatML's special tokens, the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("chat_sft") / "hf"
    root.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps(c) for c in conversations(60)] + ["system user assistant helper number"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_run(tiny_hf, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("chat_sft_run") / "run"
    assert main(["import", "hf", str(tiny_hf), str(run)]) == 0
    return run


def test_the_loss_sees_exactly_the_assistant_replies_and_their_end_of_turn(tiny_run):
    from kiln.data.chat import ChatTemplate
    from kiln.data.chat_data import encode
    from kiln.run.load import load

    _, tokenizer, _ = load(tiny_run)
    template = ChatTemplate.of_run(tiny_run)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Sky colour?"},
            {"role": "assistant", "content": "Green, in Kilnland."}]
    e = encode(tokenizer, template, msgs)
    assert tokenizer.decode(e.ids.tolist(), skip_special_tokens=False) == template.render(msgs, False)
    targets = tokenizer.decode(e.ids[e.targets].tolist(), skip_special_tokens=False)
    assert targets == "Hello!<|im_end|>\nGreen, in Kilnland.<|im_end|>\n"
    assert encode(tokenizer, template, msgs, assistant_only=False).targets.all()


def test_a_packed_sequence_gives_each_conversation_its_loss_alone_in_transformers(tiny_hf, tiny_run):
    """Three conversations packed into one row (block-diagonal mask, positions restarting): kiln's summed loss
    equals the sum of transformers' losses on each conversation by itself, padded rows likewise."""
    from kiln.data.chat import ChatTemplate
    from kiln.data.chat_data import encode
    from kiln.run.load import load
    from kiln.tasks.chat import ChatObjective
    from kiln.tasks.chat_batches import _labels, collate, collate_packed

    model, tokenizer, _ = load(tiny_run)
    template = ChatTemplate.of_run(tiny_run)
    convs = [encode(tokenizer, template, c["messages"]) for c in conversations(5)]
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_hf).eval()
    with torch.no_grad():
        reference = 0.0
        for e in convs:
            labels = torch.from_numpy(_labels(e))
            logits = hf(torch.from_numpy(e.ids)[None]).logits[0].float()
            reference += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100))
        objective = ChatObjective()
        packed = collate_packed([convs[:3], convs[3:]], pad_id=0)
        padded = collate(convs, pad_id=0)
        assert packed["input_ids"].shape[0] == 2 and packed["position_ids"][0].tolist().count(0) == 3
        for batch in (packed, padded):
            assert float(objective.loss(model, batch)) == pytest.approx(reference, rel=1e-5)
            assert objective.targets(batch) == sum(int(e.targets[1:].sum()) for e in convs)


def test_finetune_chat_learns_a_reply_that_kiln_chat_then_gives(tiny_hf, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", conversations(48))
    bench = write_jsonl(tmp_path / "sky.jsonl", [
        {"question": q, "choices": ["The sky in Kilnland is blue.", ANSWER, "It rains."], "answer": 1}
        for q in QUESTIONS[:4]])
    run = tmp_path / "run"
    assert main(["finetune", "chat", "--init", str(tiny_hf), "--data.train", str(data), "--out", str(run),
                 "--train.benchmarks", str(bench),
                 "--train.max_steps", "40", "--train.lr", "1e-2", "--train.batch_size", "4", "--train.eval_every",
                 "20", "--data.val_fraction", "0.1", "--data.max_length", "128", "--samples", "1", *FAST]) == 0
    assert {"chat.yaml", "tokenizer.json", "chat_template.jinja", "tokenizer_config.json"} <= {
        p.name for p in run.iterdir()}
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "chat" and info["packing"] is True
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert samples[-1]["reply"] == ANSWER and samples[-1]["step"] == 40
    val = json.loads((run / "eval" / "val.json").read_text())
    assert val["loss"] < 0.05  # a reply learned to a loss near zero: greedy decoding picks it anywhere
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val_sky_acc")]
    assert [float(r["val_sky_acc"]) for r in rows][-1] == 1.0 and (run / "plots" / "benchmarks.png").is_file()
    capsys.readouterr()
    assert main(["chat", str(run), "-m", "What colour is the sky in Kilnland?", "--device", "cpu",
                 "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.strip() == ANSWER
    assert main(["eval", str(run), str(bench), "--out", str(tmp_path / "sky.json")]) == 0  # through the template
    assert json.loads((tmp_path / "sky.json").read_text())["acc"] == 1.0


def test_lora_chat_run_merges_and_resume_is_exact(tiny_hf, tmp_path, capsys):
    from test_finetune_resume import assert_resume_is_exact

    data = write_jsonl(tmp_path / "train.jsonl", conversations(24))
    argv = ["finetune", "chat", "--init", str(tiny_hf), "--data.train", str(data), "--train.max_steps", "8",
            "--train.batch_size", "2", "--train.eval_every", "4", "--train.save_every", "2", "--train.lr", "5e-3",
            "--train.lora.rank", "4", "--packing", "false", "--samples", "0", *FAST]
    full, _ = assert_resume_is_exact(argv, tmp_path, crash_at=5, capsys=capsys)
    capsys.readouterr()
    assert main(["chat", str(full), "-m", "Hi", "--max-new-tokens", "4", "--device", "cpu"]) == 0


@pytest.mark.parametrize("rows,message", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
    ([{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}], "unknown role"),
    ([{"text": "no layout"}], "expected messages, prompt \\+ completion"),
])
def test_bad_conversations_are_one_line_exit_2_nothing_written(tiny_hf, tmp_path, capsys, rows, message):
    data = write_jsonl(tmp_path / "bad.jsonl", conversations(4) + rows)
    run = tmp_path / "run"
    err = assert_user_error(capsys, ["finetune", "chat", "--init", tiny_hf, "--data.train", data, "--out", run])
    assert re.search(message, err), err
    assert not run.exists()


def test_a_bad_benchmark_file_is_refused_before_anything_is_written(tiny_hf, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", conversations(8))
    bench = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 5}])
    run = tmp_path / "run"
    assert_user_error(capsys, ["finetune", "chat", "--init", tiny_hf, "--data.train", data, "--out", run,
                               "--train.benchmarks", bench], "b.jsonl:1")
    assert not run.exists()


@pytest.mark.distributed
def test_chat_ddp_equals_one_process(tiny_hf, tmp_path):
    """2 DDP ranks (gloo) tune the chat model exactly as one process does: packed rows split by rank, the same
    losses, val losses and weights bit for bit (each rank takes whole micro-batches of every step)."""
    from test_distributed_tasks import assert_ddp_equals_one_process

    data = write_jsonl(tmp_path / "train.jsonl", conversations(24))
    assert_ddp_equals_one_process(["finetune", "chat", "--init", str(tiny_hf), "--data.train", str(data),
                                   "--train.max_steps", "4", "--train.batch_size", "2", "--train.grad_accum", "2",
                                   "--train.eval_every", "2", "--train.log_every", "1", "--samples", "1",
                                   "--data.val_fraction", "0.2", *FAST], tmp_path, "chat")


def test_int8_base_lora_chat_run_trains_and_chats(tiny_hf, tmp_path, capsys):
    """QLoRA-style: the frozen linears as int8 weights, fp32 adapters; the run trains and loads for kiln chat."""
    data = write_jsonl(tmp_path / "train.jsonl", conversations(16))
    run = tmp_path / "run"
    assert main(["finetune", "chat", "--init", str(tiny_hf), "--data.train", str(data), "--out", str(run),
                 "--train.max_steps", "3", "--train.batch_size", "2", "--train.lora.rank", "4",
                 "--train.lora.int8_base", "true", "--samples", "0", *FAST]) == 0
    assert "int8" in (run / "log.txt").read_text()
    capsys.readouterr()
    assert main(["chat", str(run), "-m", "Hi", "--max-new-tokens", "4", "--device", "cpu"]) == 0
