"""Chat: `kiln chat` (one-shot and the terminal loop) and /v1/chat/completions with the real `openai` client on
SmolLM2-135M-Instruct imported from its GGUF file; chat templates carried by `kiln import hf` and rendered as
transformers renders them; bad conversations and broken templates as one-line errors."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
import openai  # noqa: E402
from test_gguf import smollm_file  # noqa: E402
from test_serve import Server, _browser  # noqa: E402

from kiln.cli import main  # noqa: E402
from kiln.data.chat import CHATML, ChatTemplate  # noqa: E402
from kiln.interop.gguf_read import import_gguf  # noqa: E402
from kiln.serve.chat import chat  # noqa: E402

DECODE = ["--precision", "fp32", "--device", "cpu"]
CHATS = [("What is the capital of France?", None), ("Name three colors.", "Answer in one short sentence."),
         ("Say hello in French.", None)]


@pytest.fixture(scope="module")
def smollm_run(tmp_path_factory) -> Path:
    return import_gguf(smollm_file(), tmp_path_factory.mktemp("chat") / "smollm2")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smollm_run) -> tuple[Path, Path]:
    """(HF folder, its kiln import): a small random Llama with SmolLM2's tokenizer and chat template in
    tokenizer_config.json, as a Hugging Face repository keeps them."""
    root = tmp_path_factory.mktemp("tiny")
    hf = root / "hf"
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    shutil.copyfile(smollm_run / "tokenizer.json", hf / "tokenizer.json")
    specials = json.loads((smollm_run / "tokenizer_config.json").read_text())
    template = (smollm_run / "chat_template.jinja").read_text()
    (hf / "tokenizer_config.json").write_text(json.dumps({**specials, "chat_template": template,
                                                         "tokenizer_class": "PreTrainedTokenizerFast"}))
    assert main(["import", "hf", str(hf), str(root / "run")]) == 0
    return hf, root / "run"


@pytest.fixture(scope="module")
def smollm_server(smollm_run):
    server = Server(smollm_run)
    yield server
    server.stop()


def kiln_chat(run: Path, capsys, message: str, system: str | None = None, *extra: str) -> str:
    args = ["chat", str(run), "-m", message, "--max-new-tokens", "40", *DECODE, *extra]
    assert main(args + (["--system", system] if system else [])) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_openai_client_equals_kiln_chat_at_temperature_0(smollm_run, smollm_server, capsys):
    expected = [kiln_chat(smollm_run, capsys, m, s) for m, s in CHATS]
    assert expected[0] == "The capital of France is Paris."
    client = smollm_server.client(timeout=300)
    for (message, system), want in zip(CHATS, expected):
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": message}]
        r = client.chat.completions.create(model=smollm_run.name, messages=messages, temperature=0,
                                           max_tokens=40)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 40
        stream = client.chat.completions.create(model=smollm_run.name, messages=messages, temperature=0,
                                                max_tokens=40, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop" and chunks[0].choices[0].delta.role == "assistant"
    # OpenAI's list of text parts and its `developer` role (the system's) read as the plain form
    parts = [{"role": "developer", "content": [{"type": "text", "text": CHATS[1][1]}]},
             {"role": "user", "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colors."}]}]
    r = client.chat.completions.create(model=smollm_run.name, messages=parts, temperature=0, max_tokens=40)
    assert r.choices[0].message.content == expected[1]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=smollm_run.name, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.param == "messages" and "unknown role 'wizard'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=smollm_run.name,
                                       messages=[{"role": "user", "content": "hello " * 9000}])
    assert e.value.code == "context_length_exceeded"


def test_playground_chat_mode_in_a_headless_browser(smollm_run, smollm_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, profile = _browser()
    try:
        browser.get(smollm_server.url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.execute_script("return document.body.dataset.ready") == "1")
        browser.find_element(By.ID, "mode_chat").click()
        box = browser.find_element(By.ID, "chat_max_tokens")
        box.clear()
        box.send_keys("40")
        client = smollm_server.client(timeout=300)
        messages = []
        for text in ("What is the capital of France?", "And of Italy?"):  # the second turn carries the first
            browser.find_element(By.ID, "message").send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: b.find_element(By.ID, "messages").get_attribute("data-state") in ("done", "error"))
            assert browser.find_element(By.ID, "messages").get_attribute("data-state") == "done", \
                browser.find_element(By.ID, "status").text
            shown = browser.execute_script(
                "const r = document.querySelectorAll('#messages .msg.assistant .text'); return r[r.length - 1].textContent")
            messages.append({"role": "user", "content": text})
            want = client.chat.completions.create(model=smollm_run.name, messages=messages, temperature=0,
                                                  max_tokens=40).choices[0].message.content
            assert shown == want
            messages.append({"role": "assistant", "content": want})
        assert messages[1]["content"] == "The capital of France is Paris."
        browser.save_screenshot(str(tmp_path / "serve_playground_chat.png"))
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_the_terminal_loop_keeps_history_and_resets(smollm_run, capsys):
    lines = iter(["What is the capital of France?", "And of Italy?", "/reset", "And of Italy?", "/exit"])
    out = io.StringIO()
    chat(smollm_run, system=None, max_new_tokens=24, precision="fp32", device="cpu", read=lambda _: next(lines),
         out=out)
    replies = [line for line in out.getvalue().splitlines()[1:] if not line.startswith("(a new")]
    assert replies[0] == "The capital of France is Paris."
    # after /reset the same question has no history: it is the one-shot reply to it alone
    assert replies[2] == kiln_chat(smollm_run, capsys, "And of Italy?", None, "--max-new-tokens", "24")
    assert replies[1] != replies[2]  # with the history, "And of Italy?" is read as a follow-up


def test_import_hf_carries_the_chat_template_rendered_as_transformers(tiny_run):
    hf, run = tiny_run
    assert (run / "chat_template.jinja").is_file()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    ours = ChatTemplate.of_run(run)
    chatml = ChatTemplate(None)
    conversations = [[{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]]
    for messages in conversations:
        for add in (True, False):
            assert ours.render(messages, add) == hf_tok.apply_chat_template(messages, add_generation_prompt=add,
                                                                            tokenize=False)
            assert chatml.render(messages, add) == hf_tok.apply_chat_template(
                messages, chat_template=CHATML, add_generation_prompt=add, tokenize=False)


def test_bad_conversations_and_templates_are_one_line_exit_2(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    assert main(["chat", str(run), "-m", "hello " * 200, *DECODE]) == 2  # the context is 96 tokens
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "context is 96 tokens" in err
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    for source, expect in (("{{ raise_exception('no system messages here') }}", "no system messages here"),
                           ("{% for m in messages %}{{ m.content | nofilter }}{% endfor %}", "not a valid Jinja"),
                           ("{{ messages[0]['content'] + 3 }}", "failed to render")):
        (broken / "chat_template.jinja").write_text(source)
        assert main(["chat", str(broken), "-m", "hi", *DECODE]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expect in err, err
    with pytest.raises(Exception, match="unknown role 'robot'"):
        ChatTemplate.of_run(run).render([{"role": "robot", "content": "hi"}])


def test_export_hf_carries_the_template_and_special_tokens(smollm_run, tmp_path):
    """The run's chat template and special tokens travel into `kiln export hf`: transformers renders the same
    prompt from the exported folder and its model gives kiln's logits."""
    import torch

    from kiln.run.load import load

    out = tmp_path / "hf"
    assert main(["export", "hf", str(smollm_run), str(out)]) == 0
    assert (out / "chat_template.jinja").read_text() == (smollm_run / "chat_template.jinja").read_text()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = ChatTemplate.of_run(smollm_run).render(messages)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    model, tokenizer, _ = load(smollm_run)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids])
    assert ids[0].tolist() == hf_tok.encode(text, add_special_tokens=False)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max().item() < 1e-4
