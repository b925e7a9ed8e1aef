"""`kiln pretrain`: config -> data -> model -> Trainer -> checkpoints, plots and a sample."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from kiln.config import RunConfig, dump_yaml, load_config
from kiln.errors import KilnError
from kiln.model.transformer import Transformer
from kiln.train.batches import TokenBatches, eval_windows
from kiln.train.objectives import CausalLM, evaluate_lm
from kiln.train.precision import choose_precision
from kiln.train.trainer import Trainer


class RunLog:
    """Print to the console and append to run_dir/log.txt."""

    def __init__(self, run_dir: Path | None = None, quiet: bool = False):
        self.file = open(run_dir / "log.txt", "a", encoding="utf-8") if run_dir else None
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def new_run_dir(cfg: RunConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KilnError(f"train.device is {name!r} but no CUDA device is available; use cpu or auto")
    return name


def load_data(cfg: RunConfig, run_dir: Path, log):
    """(train source, val source, manifest): prepared shards, preparing them into the run folder if needed."""
    from kiln.data.prepare import prepare
    from kiln.data.shards import TokenShards, read_manifest

    if cfg.data.prepared:
        data_dir = Path(cfg.data.prepared)
        manifest = read_manifest(data_dir)
    else:
        data_dir = run_dir / "data"
        if (data_dir / "manifest.json").is_file():
            manifest = read_manifest(data_dir)
        else:
            manifest = prepare(cfg.data, data_dir, seed=cfg.seed, log=log)
    tok = data_dir / manifest.get("tokenizer", "tokenizer.json")
    if tok.is_file() and not (run_dir / "tokenizer.json").is_file():
        shutil.copyfile(tok, run_dir / "tokenizer.json")
    return TokenShards(data_dir, "train"), TokenShards(data_dir, "val"), manifest


def run_pretrain(cfg: RunConfig, resume: str | Path | None = None, quiet: bool = False) -> Path:
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise KilnError(f"cannot resume: {run_dir} is not a run folder (no config.yaml)")
        from kiln.train.checkpoint import find_checkpoint, load_trainer_state

        load_trainer_state(find_checkpoint(run_dir))  # fail early on a missing or corrupted checkpoint
    else:
        run_dir = new_run_dir(cfg)
        if (run_dir / "checkpoints").exists():
            raise KilnError(f"run folder {run_dir} already holds checkpoints; use --resume {run_dir} or another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir, quiet)
    torch.manual_seed(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)

    train_src, val_src, manifest = load_data(cfg, run_dir, log)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = int(manifest["vocab_size"])
    elif cfg.model.vocab_size < int(manifest["vocab_size"]):
        raise KilnError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{manifest['vocab_size']}")
    cfg.model.resolve()
    precision, reason = choose_precision(cfg.train.precision, device)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    log(f"kiln pretrain -> {run_dir}")
    log(dump_yaml(cfg).rstrip())
    log(reason)

    model = Transformer(cfg.model).to(device)
    n_params = model.num_parameters()
    T, B = cfg.model.context_length, cfg.train.batch_size
    log(f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters; data: {len(train_src):,} train / "
        f"{len(val_src):,} val tokens; batch {B} x {cfg.train.grad_accum} x {T} tokens")
    batches = TokenBatches(train_src, T, B, cfg.seed)
    list(eval_windows(val_src, T, B, 1))  # fail early if val is shorter than one window
    objective = CausalLM()
    trainer = Trainer(model, objective, cfg.train, run_dir, batches.batch,
                      evaluate=lambda m: evaluate_lm(m, objective,
                                                     lambda: (b.to(device) for b in eval_windows(val_src, T, B, cfg.train.eval_batches))),
                      device=device, precision=precision, log=log)
    result = trainer.fit(resume_from=run_dir if resume is not None else None)
    log(f"done: step {result['step']}, {result['tokens']:,} tokens in {result['elapsed']:.1f}s; "
        f"val loss {result.get('val_loss', float('nan')):.4f}; run folder {run_dir}")
    if cfg.train.sample_tokens and cfg.model.arch == "decoder" and (run_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
        ids = tok.encode(cfg.train.sample_prompt).ids or [0]
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        out = model.generate(torch.tensor([ids], device=device), cfg.train.sample_tokens, temperature=0.8,
                             top_k=50, generator=g)
        log("sample:\n" + tok.decode(out[0].tolist()))
    return run_dir


def pretrain_from_cli(config: str | None, overrides: list[str], resume: str | None) -> Path:
    if resume is not None:
        cfg = load_config(Path(resume) / "config.yaml", overrides)
    else:
        cfg = load_config(config, overrides)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_pretrain(cfg, resume=resume)
