"""`kiln finetune chat`: instruction tuning of a decoder on conversations, on the shared driver.

    kiln import gguf SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2
    kiln finetune chat --init runs/smollm2 --data.train conversations.jsonl --train.lora.rank 8 --train.lr 2e-4

Read the conversations (kiln.data.chat_data: messages, prompt-completion or Alpaca JSONL) -> the model and its
tokenizer and chat template (init: a kiln run or a Hugging Face folder; ChatML when it has no template) ->
render and tokenize each conversation, the loss on the assistant's tokens -> pack conversations into sequences
(block-diagonal attention, positions restarting) or pad them -> the causal LM loss -> val loss and a few greedy
sample replies at each evaluation -> the best checkpoint by val loss.

The run folder loads like any decoder run (kiln chat, generate, serve, export hf/gguf): chat.yaml, run.json (kind
chat), tokenizer.json, chat_template.jinja, tokenizer_config.json, data.json, checkpoints/, eval/ (val.json,
test.json, samples.jsonl), metrics.csv, log.txt, base/ (an imported Hugging Face init).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from kiln.constants import IGNORE_INDEX
from kiln.data import chat_data
from kiln.data.chat import TEMPLATE_FILE, TOKENIZER_CONFIG, ChatTemplate, stop_tokens
from kiln.data.chat_data import CONFIG_FILE, ChatConfig, EncodedChat
from kiln.data.benchmarks import read_benchmark
from kiln.errors import KilnError
from kiln.eval.benchmarks import score_benchmark
from kiln.report.plots import metric_curve
from kiln.run.checkpoint import unwrap
from kiln.tasks.backbone import load_backbone
from kiln.tasks.base import Data, EpochTask, Prepared, eval_batch_size
from kiln.tasks.chat_batches import ChatBatches, collate


class ChatObjective:
    """Cross-entropy of the next token where the label says (IGNORE_INDEX elsewhere): a SUM and its count."""

    def targets(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        return model(batch["input_ids"], labels=batch["labels"], **inputs)


def _key(conv: list[dict]) -> str:
    return hashlib.sha1(json.dumps(conv, sort_keys=True).encode()).hexdigest()


def _split(convs: list, val: float, test: float, seed: int) -> tuple[list, list, list]:
    order = np.random.default_rng(seed).permutation(len(convs))
    n_val, n_test = int(round(val * len(convs))), int(round(test * len(convs)))
    pick = [[convs[i] for i in part] for part in np.split(order, [n_val, n_val + n_test])]
    return pick[2], pick[0], pick[1]


class ChatTask(EpochTask):
    name, config_cls, config_file = "chat", ChatConfig, CONFIG_FILE
    usage = "kiln finetune chat [CONFIG.yaml] --data.train FILE.jsonl --init RUN_OR_HF_DIR [--section.key VALUE ...]"
    batch_unit = "sequences"
    throughput_unit = "tok"

    def check(self, cfg: ChatConfig) -> None:
        _benchmarks(cfg)  # a bad benchmark file is one line before anything is read or written

    def read(self, cfg: ChatConfig, log) -> Data:
        d = cfg.data
        if not d.train:
            raise KilnError("data.train is empty: name the conversations file (--data.train FILE.jsonl)")
        given = {n: chat_data.read_conversations(getattr(d, n), d.layout, d.encoding)
                 for n in ("train", "val", "test") if getattr(d, n)}
        train, dropped = given.pop("train"), 0
        if d.dedup:
            keep = list({_key(c): c for c in reversed(train)}.values())[::-1]
            train, dropped = keep, len(train) - len(keep)
        tr, va, te = _split(train, 0.0 if "val" in given else d.val_fraction,
                            0.0 if "test" in given else d.test_fraction, cfg.seed)
        splits = {"train": tr, "val": given.get("val", va), "test": given.get("test", te)}
        log("conversations: " + ", ".join(f"{n} {len(s)}" for n, s in splits.items())
            + f"; turns {chat_data.roles_seen(train)}" + (f"; dropped {dropped} duplicate(s)" if dropped else ""))
        report = {"files": {n: getattr(d, n) for n in ("train", "val", "test") if getattr(d, n)},
                  "duplicates_dropped": dropped, "splits": {n: len(s) for n, s in splits.items()},
                  "fingerprint": {n: hashlib.sha1("".join(map(_key, s)).encode()).hexdigest()[:16]
                                  for n, s in splits.items()}}
        return Data(splits, report)

    def prepare(self, cfg: ChatConfig, run_dir: Path, data: Data, device: str, log) -> Prepared:
        model, tokenizer, info = load_backbone(cfg.init, cfg.init_checkpoint, run_dir, log)
        if model.config.arch != "decoder":
            raise KilnError(f"init {cfg.init} is a {model.config.arch} model: kiln finetune chat tunes a decoder")
        cfg.model = copy.deepcopy(model.config)
        source = Path(info.get("imported_to", cfg.init))
        template = ChatTemplate.of_run(source)
        T = min(cfg.data.max_length, cfg.model.context_length)
        enc, cut = {}, {}
        for n, convs in data.splits.items():
            enc[n], cut[n] = _encode_all(tokenizer, template, convs, cfg.assistant_only, T)
        data.report.update(init=info, truncated=cut, template="ChatML (init has none)" if template.is_default
                           else str(source / TEMPLATE_FILE))
        if any(cut.values()):
            log("truncation: " + ", ".join(f"{n} {c}" for n, c in cut.items()) + f" conversation(s) longer than "
                f"{T} tokens cut there (the rest of those replies is never seen)")
        if not any(e.targets[1:].any() for e in enc["train"]):
            raise KilnError(f"{cfg.data.train}: no assistant token is left to learn from (data.max_length {T})")
        batches = ChatBatches(enc["train"], T, cfg.train.batch_size, cfg.seed, cfg.packing, cfg.model.pad_id)
        log(batches.describe())
        evaluate, on_eval = _validation(cfg, data.splits["val"], enc["val"], tokenizer, template, device,
                                        run_dir, log)

        def save(run_dir: Path) -> None:
            tokenizer.save(str(run_dir / "tokenizer.json"))
            for name in (TEMPLATE_FILE, TOKENIZER_CONFIG):
                if (source / name).is_file():
                    shutil.copyfile(source / name, run_dir / name)
        meta = {"max_length": T, "packing": cfg.packing, "assistant_only": cfg.assistant_only,
                "conversations": len(enc["train"]), "rows": len(batches)}
        notes = [f"decoder ({info['kind']}: {cfg.init}); chat template: {data.report['template']}"]
        return Prepared(model, ChatObjective(), batches.batch, len(batches), evaluate, "val_loss", meta, save,
                        on_eval, notes, state={"enc": enc, "device": device}, unit="tok")

    def test(self, cfg, prep: Prepared, model, ckpt: Path, run_dir: Path, log) -> dict:
        results = {}
        for name in ("val", "test"):
            if len(prep.state["enc"][name]):
                loss = mean_loss(model, prep.state["enc"][name], cfg, prep.state["device"])
                results[name] = {"loss": loss, "ppl": float(np.exp(min(loss, 50.0)))}
                _write_json(run_dir / "eval" / f"{name}.json", {**results[name], "checkpoint": str(ckpt)})
        if "test" in results:
            log(f"test: loss {results['test']['loss']:.4f}  ppl {results['test']['ppl']:.2f}")
        return results

    def load(self, run_dir, which: str = "best", device: str = "cpu"):
        """(model, tokenizer, ChatConfig, run.json) of a chat run."""
        from kiln.config import load_config
        from kiln.run.folder import read_run_json
        from kiln.run.load import load

        model, tokenizer, _ = load(run_dir, which, device)
        return model, tokenizer, load_config(Path(run_dir) / CONFIG_FILE, cls=ChatConfig), read_run_json(run_dir)

    def evaluate_file(self, run_dir, file, out=None, which: str = "best", log=print, benchmark: str | None = None,
                      chat: bool = True, batch_size: int = 8, device: str = "auto", max_new_tokens: int = 32,
                      **kw) -> dict:
        """On a benchmark file (--benchmark, or rows of a benchmark layout): acc / acc_norm or exact match, each
        question a user turn of the run's chat template; on conversations: the loss on the assistant's tokens."""
        from kiln.data.benchmarks import sniff

        if benchmark or sniff(file):
            from kiln.eval.benchmarks import evaluate_benchmark

            return evaluate_benchmark(Path(run_dir), file, out, which, chat=True, layout=benchmark or "auto",
                                      batch_size=batch_size, device=device, max_new_tokens=max_new_tokens, log=log)
        model, tokenizer, cfg, info = self.load(run_dir, which)
        template = ChatTemplate.of_run(run_dir)
        convs = chat_data.read_conversations(file, cfg.data.layout, cfg.data.encoding)
        enc, cut = _encode_all(tokenizer, template, convs, cfg.assistant_only, info.get("max_length", 1024))
        loss = mean_loss(model, enc, cfg, "cpu")
        result = {"file": str(file), "conversations": len(convs), "truncated": cut, "loss": loss,
                  "ppl": float(np.exp(min(loss, 50.0)))}
        out = Path(out) if out else Path(run_dir) / "eval" / f"{Path(file).stem}.json"
        _write_json(out, result)
        log(f"{file}: loss {loss:.4f}  ppl {result['ppl']:.2f} over {len(convs)} conversation(s) -> {out}")
        return result


def _encode_all(tokenizer, template, convs, assistant_only: bool, T: int) -> tuple[list[EncodedChat], int]:
    out, cut = [], 0
    for conv in convs:
        e = chat_data.encode(tokenizer, template, conv, assistant_only)
        if len(e.ids) > T:
            e, cut = EncodedChat(e.ids[:T], e.targets[:T]), cut + 1
        out.append(e)
    return out, cut


@torch.no_grad()
def mean_loss(model, enc: list[EncodedChat], cfg, device: str) -> float:
    """Mean cross-entropy per target token over conversations (each its own padded row)."""
    was = model.training
    model.eval()
    total, n, bs = 0.0, 0, eval_batch_size(cfg)
    objective = ChatObjective()
    for i in range(0, len(enc), bs):
        batch = {k: v.to(device) for k, v in collate(enc[i:i + bs], cfg.model.pad_id).items()}
        total += float(objective.loss(model, batch))
        n += objective.targets(batch)
    model.train(was)
    return total / max(n, 1)


def _validation(cfg: ChatConfig, convs, enc, tokenizer, template, device: str, run_dir: Path, log):
    """(evaluate, on_eval): the val loss, the scores of train.benchmarks, and greedy replies to the first
    `samples` val prompts; on_eval (rank 0) logs the replies, appends them to eval/samples.jsonl and plots the
    benchmark scores."""
    benches = _benchmarks(cfg)
    if not len(enc) and not benches:
        return None, None
    prompts = [chat_data.last_prompt(c) for c in convs[:cfg.samples]]
    stop_ids = stop_tokens(tokenizer, template)[0]
    latest: list[dict] = []
    history: list[tuple[int, dict]] = []

    def evaluate(m) -> dict:
        out = {}
        if len(enc):
            loss = mean_loss(m, enc, cfg, device)
            out.update(val_loss=loss, val_ppl=float(np.exp(min(loss, 50.0))))
        for name, items in benches.items():
            scores = score_benchmark(unwrap(m), tokenizer, items, context_length=cfg.model.context_length,
                                     template=template, batch_size=eval_batch_size(cfg), device=device)
            out.update({f"val_{name}_{k}": scores[k] for k in ("acc", "acc_norm", "exact_match") if k in scores})
        latest[:] = [{"prompt": p[-1]["content"] if p else "", "reference": ref,
                      "reply": reply(unwrap(m), tokenizer, template, p, cfg.sample_tokens, stop_ids, device)}
                     for p, ref in prompts]
        return out

    def on_eval(step: int, metrics: dict) -> None:
        for s in latest:
            log(f"  sample: {s['prompt'][:60]!r} -> {s['reply'][:120]!r}")
        path = run_dir / "eval" / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for s in latest:
                f.write(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n")
        keys = tuple(k[4:] for k in metrics if k.startswith("val_") and k not in ("val_loss", "val_ppl"))
        if keys:
            history.append((step, metrics))
            metric_curve(history, keys, run_dir / "plots" / "benchmarks.png", f"{run_dir.name}: benchmarks",
                         ylabel="score (0-1)")
    return evaluate, on_eval


def _benchmarks(cfg: ChatConfig) -> dict[str, list]:
    """name (the file's stem) -> items of each train.benchmarks file, read (and checked) before training."""
    files = [f.strip() for f in cfg.train.benchmarks.split(",") if f.strip()]
    out = {Path(f).stem.replace("-", "_"): read_benchmark(f)[0] for f in files}
    if len(out) < len(files):
        raise KilnError(f"train.benchmarks: two files share the name {Path(files[-1]).stem!r}; rename one")
    return out


@torch.no_grad()
def reply(model, tokenizer, template, messages: list[dict], max_new: int, stop_ids: list[int], device: str) -> str:
    """The greedy reply to a conversation (rendered with the generation prompt), cut at the end of turn."""
    ids = tokenizer.encode(template.render(messages, add_generation_prompt=True), add_special_tokens=False).ids
    room = model.config.context_length - len(ids)
    if room <= 0:
        return ""
    was = model.training
    model.eval()
    stops = torch.tensor(stop_ids or [-1], device=device)
    out = model.generate(torch.tensor([ids], device=device), min(max_new, room), greedy=True,
                         stop=lambda new: torch.isin(new[:, -1], stops))
    model.train(was)
    new = out[0, len(ids):].tolist()
    cut = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
    return tokenizer.decode(new[:cut])


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


TASK = ChatTask()
