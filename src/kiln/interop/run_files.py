"""Writing an imported decoder as a kiln run folder, and the tokenizer files a run keeps beside tokenizer.json.

A run keeps its special tokens in tokenizer_config.json and its chat template in chat_template.jinja, the
file names transformers uses, so `kiln export hf` copies them as they are and kiln.data.chat reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln.model.config import ModelConfig

TOKENIZER_CONFIG, CHAT_TEMPLATE = "tokenizer_config.json", "chat_template.jinja"


def chat_files(src: Path) -> tuple[dict, str | None]:
    """(special tokens of tokenizer_config.json, chat template) of a Hugging Face folder: the template from
    chat_template.jinja, else tokenizer_config.json's `chat_template` (a string, or a list of named templates
    of which kiln keeps "default")."""
    config = {}
    if (src / TOKENIZER_CONFIG).is_file():
        try:
            config = json.loads((src / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            config = {}
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (src / CHAT_TEMPLATE).is_file():
        template = (src / CHAT_TEMPLATE).read_text(encoding="utf-8")
    specials = {}
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(role)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            specials[role] = value
    for key in ("add_bos_token", "add_eos_token"):
        if isinstance(config.get(key), bool):
            specials[key] = config[key]
    return specials, template if isinstance(template, str) else None


def write_chat_files(run_dir: Path, tokenizer_config: dict | None, chat_template: str | None) -> None:
    from kiln.run.checkpoint import atomic_write_text

    if tokenizer_config:
        atomic_write_text(run_dir / TOKENIZER_CONFIG, json.dumps(tokenizer_config, indent=2) + "\n")
    if chat_template:
        atomic_write_text(run_dir / CHAT_TEMPLATE, chat_template)


def write_imported_run(run_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], *, name: str, source: Path,
                       tokenizer_json: str | None, tokenizer_config: dict | None, chat_template: str | None,
                       model_type: str) -> Path:
    """config.yaml, run.json, tokenizer files and checkpoints/step_000000 of a pretraining-kind run holding
    `state`, written under the run folder's lock."""
    from kiln.config import RunConfig, dump_yaml
    from kiln.run.checkpoint import atomic_write_text, save_checkpoint
    from kiln.run.folder import RunLock, write_run_json
    from kiln.run.load import build_model

    model = build_model(cfg, "cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    assert not [m for m in missing if m not in tied] and not unexpected, (missing, unexpected)
    run = RunConfig(name=name, out=str(run_dir), model=cfg, objective="clm")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        if tokenizer_json is not None:
            atomic_write_text(run_dir / "tokenizer.json", tokenizer_json)
            run.data.tokenizer = str(run_dir / "tokenizer.json")
        write_chat_files(run_dir, tokenizer_config, chat_template)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(run))
        origin = {"imported_from": str(source.resolve()), "source_format": model_type}
        write_run_json(run_dir, "pretrain", "config.yaml", **origin)
        save_checkpoint(run_dir, model, 0, trainer_state=None, meta=origin)
    finally:
        lock.release()
    return run_dir
