"""`kiln pretrain`: config -> data -> model -> Trainer -> checkpoints, plots and a sample."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

import torch

from kiln.config import RunConfig, dump_yaml, load_config
from kiln.errors import KilnError
from kiln.model.transformer import Transformer
from kiln.data.batches import TokenBatches, eval_windows
from kiln.train.scaling import env_world, scale_batch_and_lr  # noqa: F401  (scale_batch_and_lr: re-exported)
from kiln.train.distributed import broadcast, init_distributed, leave_process_group_after, main_first, \
    resolve_backend, wrap_model
from kiln.run.checkpoint import load_weights, weights_prefix
from kiln.train.objectives import CausalLM, evaluate_lm
from kiln.train.pretrain_objectives import objective_for
from kiln.run.device import choose_precision, resolve_device
from kiln.run.folder import RunLock, RunLog, create_run, default_run_dir, write_run_json
from kiln.train.trainer import Trainer


def load_mixture(cfg: RunConfig, run_dir: Path, log):
    """(train sources, val sources, datasets, manifest of the first) of data.mixture."""
    from kiln.data.mixture import read_mixture
    from kiln.data.shards import TokenShards

    datasets = read_mixture(cfg.data.mixture)
    first = datasets[0]
    tok = first.folder / first.manifest.get("tokenizer", "tokenizer.json")
    if tok.is_file() and not (run_dir / "tokenizer.json").is_file():
        shutil.copyfile(tok, run_dir / "tokenizer.json")
    train = [TokenShards(d.folder, "train", d.manifest) for d in datasets]
    val = [TokenShards(d.folder, "val", d.manifest) for d in datasets]
    return train, val, datasets, first.manifest


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
    # cheap checks of the config first: under torchrun every rank fails alike (one line, exit 2), before any work
    device = resolve_device(cfg.train.device)
    _, world, _ = env_world()
    train_cfg, batch_line = scale_batch_and_lr(cfg, world)
    if world > 1:
        resolve_backend(cfg.train.backend, device)
    spec = objective_for(cfg)
    if cfg.train.lora.rank and (cfg.objective == "electra" or not cfg.init):
        raise KilnError(f"train.lora.rank {cfg.train.lora.rank}: LoRA is for continued pretraining of a model "
                        + ("with objective clm or mlm (ELECTRA trains a new generator beside it)"
                           if cfg.objective == "electra" else "given by init (a kiln run folder)"))
    if cfg.objective == "electra":
        spec.check(cfg)  # a pure config check, before any work (the arch check waits for init's shape)
    notes: list[str] = []  # what init/distill decided, logged once the run folder exists
    init_ckpt, init_prefix = _init_from(cfg, notes) if cfg.init and resume is None else (None, "")
    teacher_dir = _distill_data(cfg, notes) if cfg.distill.teacher else None
    info, device = init_distributed(cfg.train.backend, device)
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise KilnError(f"cannot resume: {run_dir} is not a run folder (no config.yaml)")
        from kiln.run.checkpoint import find_checkpoint, load_trainer_state

        if info.is_main:  # one writer: refuse a resume while the run is still going
            lock = RunLock(run_dir).acquire()
        load_trainer_state(find_checkpoint(run_dir))  # fail early on a missing or corrupted checkpoint
    else:
        run_dir = broadcast(info, default_run_dir(cfg.name, cfg.out))  # rank 0's timestamp
        if (run_dir / "checkpoints").exists():
            raise KilnError(f"run folder {run_dir} already holds checkpoints; use --resume {run_dir} or another --out")
        if info.is_main:
            lock = create_run(run_dir, "pretrain", resume_hint=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir, quiet) if info.is_main else RunLog(None, quiet=True)  # only rank 0 writes
    torch.manual_seed(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    for note in notes:
        log(note)
    if cfg.data.mixture:
        train_srcs, val_srcs, datasets, manifest = main_first(info, lambda: load_mixture(cfg, run_dir, log))
    else:  # rank 0 prepares the data (if needed) while the others wait
        train_src, val_src, manifest = main_first(info, lambda: load_data(cfg, run_dir, log))
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = int(manifest["vocab_size"])
    elif cfg.model.vocab_size < int(manifest["vocab_size"]):
        raise KilnError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{manifest['vocab_size']}")
    spec.check(cfg)
    plan = spec.prepare(cfg, run_dir, manifest)
    cfg.model.resolve()
    precision, reason = broadcast(info, choose_precision(cfg.train.precision, device))  # measured: ranks agree on rank 0's
    if info.is_main:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        write_run_json(run_dir, "pretrain", "config.yaml", objective=cfg.objective, arch=cfg.model.arch)
    log(f"kiln pretrain -> {run_dir}")
    log(dump_yaml(cfg).rstrip())
    log(reason)
    if info.enabled:
        log(f"distributed: {info.world_size} ranks, backend {info.backend}, {cfg.train.parallel}"
            f"{', activation checkpointing' if cfg.train.activation_checkpointing else ''}")
    log(batch_line)
    if info.enabled and precision == "bf16" and getattr(train_cfg, "bf16_weights", False):
        # the trainer's bf16 twin is a copy of the plain model; DDP/FSDP wrap the model itself
        train_cfg = dataclasses.replace(train_cfg, bf16_weights=False)
        log(f"bf16 with {cfg.train.parallel}: autocast (train.bf16_weights applies to single-process runs)")

    model = Transformer(cfg.model).to(device)
    if init_ckpt is not None:
        _check_same_tokenizer(Path(cfg.init), run_dir, "init")
        load_weights(model, init_ckpt / "model.safetensors", prefix=init_prefix)
        log(f"init: weights from {init_ckpt}")
    n_params = model.num_parameters()
    if cfg.train.lora.rank:  # continued pretraining with adapters: the init weights stay frozen
        from kiln.model.lora import lora_from_config

        lora_from_config(model, cfg.train.lora, log)
    model = spec.wrap(cfg, model, device, log)
    T, B = cfg.model.context_length, cfg.train.batch_size
    objective = CausalLM()

    def val_loss(m, src) -> dict:
        return evaluate_lm(m, objective, lambda: (b.to(device) for b in eval_windows(src, T, B, cfg.train.eval_batches)))

    if cfg.data.mixture:
        from kiln.data.mixture import MixtureTokens

        batches = MixtureTokens(train_srcs, [d.weight for d in datasets], T, B, cfg.seed, rank=info.rank,
                                world_size=info.world_size, names=[d.name for d in datasets])
        for src in val_srcs:
            list(eval_windows(src, T, B, 1))  # fail early if a val split is shorter than one window
        sizes = ", ".join(f"{d.name} {len(t):,} train / {len(v):,} val" for d, t, v in zip(datasets, train_srcs, val_srcs))
        log(f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters; data (tokens): {sizes}")
        log(batches.report(cfg.train.max_steps * B * train_cfg.grad_accum * info.world_size))

        def evaluate(m) -> dict:  # each dataset's val loss, and their mean weighted like the mixture
            per = {f"val_loss_{d.name}": val_loss(m, src)["val_loss"] for d, src in zip(datasets, val_srcs)}
            mean = sum(d.weight * per[f"val_loss_{d.name}"] for d in datasets)
            return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), **per}
    else:
        log(f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters; data: {len(train_src):,} train / "
            f"{len(val_src):,} val tokens")
        batches = TokenBatches(train_src, T, B, cfg.seed, rank=info.rank, world_size=info.world_size)
        list(eval_windows(val_src, T, B, 1))  # fail early if val is shorter than one window

        def evaluate(m) -> dict:
            return val_loss(m, val_src)
    train_objective = objective  # evaluation stays plain cross-entropy on the val split
    if teacher_dir is not None:
        train_objective = _teacher_objective(cfg, teacher_dir, run_dir, device, precision, n_params, log)
    model = wrap_model(model, info, cfg.train.parallel, device, cfg.train.activation_checkpointing)
    next_batch = batches.batch
    if plan.objective is not None:  # the objective's own loss, batches and validation (kiln.train.pretrain_objectives)
        train_objective = plan.objective

        def next_batch(i):  # noqa: F811
            return plan.batch(batches.batch(i), i)

        def evaluate(m) -> dict:  # noqa: F811
            return plan.evaluate(m, lambda: (b.to(device) for b in eval_windows(val_src, T, B, cfg.train.eval_batches)))
    trainer = Trainer(model, train_objective, train_cfg, run_dir, next_batch, evaluate=evaluate,
                      device=device, precision=precision, log=log, world_size=info.world_size, is_main=info.is_main,
                      rank=info.rank, seed=cfg.seed)
    trainer.throughput_unit = plan.unit  # the trainer counts targets: for MLM the masked tokens, ~15% of the input
    if train_cfg.batch_ramp_tokens:
        from kiln.train.ramp import BatchRamp

        if train_cfg.grad_accum < 2:
            raise KilnError("train.batch_ramp_tokens needs a global batch of several micro-batches: set "
                            "train.batch_tokens (or train.grad_accum) above one micro-batch per rank")
        power = {"linear": 1.0, "sqrt": 0.5}.get(train_cfg.lr_scaling, 0.0)
        trainer.ramp = BatchRamp(train_cfg.grad_accum, B * T * info.world_size, train_cfg.batch_ramp_tokens, power)
        log(f"batch ramp: 1 -> {train_cfg.grad_accum} micro-batches per step over {train_cfg.batch_ramp_tokens:,} "
            f"tokens, lr x (batch / target)^{power:g}")
    result = trainer.fit(resume_from=run_dir if resume is not None else None)
    log(f"done: step {result['step']}, {result['tokens']:,} tokens in {result['elapsed']:.1f}s; "
        f"val loss {result.get('val_loss', float('nan')):.4f}; run folder {run_dir}")
    if cfg.train.sample_tokens and cfg.model.arch == "decoder" and (run_dir / "tokenizer.json").is_file():
        model = sampling_model(model, cfg, device)  # a collective under FSDP; None on ranks other than 0
    else:
        model = None
    if model is not None and info.is_main:
        from tokenizers import Tokenizer

        from kiln.data.tokenizer import encode_text

        tok = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
        try:  # the run is trained and saved: a prompt the tokenizer cannot encode skips the sample, one line
            ids = encode_text(tok, cfg.train.sample_prompt, "train.sample_prompt") or [0]
        except KilnError as e:
            log(f"sample skipped: {e}")
        else:
            g = torch.Generator(device=device).manual_seed(cfg.seed)
            out = model.generate(torch.tensor([ids], device=device), cfg.train.sample_tokens, temperature=0.8,
                                 top_k=50, generator=g)
            log("sample:\n" + tok.decode(out[0].tolist()))
    if info.is_main:
        lock.release()
    return run_dir


def _init_from(cfg: RunConfig, notes: list[str]) -> tuple[Path, str]:
    """`init`: take the run's model shape and (unless the data names its own) its tokenizer; return its checkpoint
    and the prefix of the model's weights in it (kiln.run.checkpoint.weights_prefix)."""
    from kiln.run.load import load_run_config
    from kiln.run.checkpoint import find_checkpoint

    init = Path(cfg.init).expanduser()
    if not (init / "config.yaml").is_file():
        raise KilnError(f"init {init} is not a kiln run folder (no config.yaml); import a Hugging Face model "
                        f"first with `kiln import hf SRC {init}`")
    ckpt = find_checkpoint(init, cfg.init_checkpoint)
    icfg = load_run_config(init)
    cfg.model = icfg.model
    if cfg.objective == "clm" and cfg.model.arch != "decoder":
        raise KilnError(f"init {init} is an {cfg.model.arch} model; causal-LM training needs a decoder "
                        f"(objective mlm trains an encoder)")
    if not cfg.data.prepared and cfg.data.tokenizer == "char" and (init / "tokenizer.json").is_file():
        cfg.data.tokenizer = str(init / "tokenizer.json")
    notes.append(f"init: model shape from {init} ({cfg.model.arch}, {cfg.model.n_layer} layers, d_model "
                 f"{cfg.model.d_model}, vocab {cfg.model.vocab_size}); tokenizer "
                 f"{cfg.data.tokenizer if not cfg.data.prepared else 'of data.prepared'}")
    return ckpt, weights_prefix(icfg)


def _check_same_tokenizer(source: Path, run_dir: Path, key: str) -> None:
    theirs, ours = source / "tokenizer.json", run_dir / "tokenizer.json"
    if theirs.is_file() and ours.is_file() and theirs.read_bytes() != ours.read_bytes():
        raise KilnError(f"{key} {source}: its tokenizer.json differs from this run's data; prepare the data with "
                        f"--data.tokenizer {theirs}")


def _distill_data(cfg: RunConfig, notes: list[str]) -> Path:
    """Check the teacher run and the distill keys; train on its token shards unless data.prepared names others."""
    teacher = Path(cfg.distill.teacher).expanduser()
    if cfg.distill.augment:
        raise KilnError("distill.augment is for finetune classify; pretraining distills on the token shards")
    if "," in cfg.distill.teacher and not teacher.exists():
        raise KilnError(f"distill.teacher {cfg.distill.teacher!r}: pretraining distills from one teacher run; "
                        f"an ensemble of teachers is for finetune classify")
    if not (teacher / "config.yaml").is_file():
        raise KilnError(f"distill.teacher {teacher} is not a kiln run folder (no config.yaml)")
    if not 0.0 <= cfg.distill.alpha <= 1.0 or cfg.distill.temperature <= 0:
        raise KilnError(f"distill.alpha must be in [0, 1] and distill.temperature > 0 "
                        f"(got {cfg.distill.alpha}, {cfg.distill.temperature})")
    if cfg.objective != "clm" or cfg.model.arch != "decoder" or cfg.data.mixture:
        raise KilnError("distill.teacher works with causal-LM pretraining of a decoder on one dataset "
                        f"(got objective {cfg.objective}, model.arch {cfg.model.arch}"
                        f"{', a mixture' if cfg.data.mixture else ''})")
    if not cfg.data.prepared:
        tcfg = load_config(teacher / "config.yaml")
        data = Path(tcfg.data.prepared) if tcfg.data.prepared else teacher / "data"
        if not (data / "manifest.json").is_file():
            raise KilnError(f"distill.teacher {teacher}: its token shards ({data}) are gone; set data.prepared")
        cfg.data.prepared = str(data)
        notes.append(f"distill: training on the teacher's token shards {data}")
    return teacher


def _teacher_objective(cfg: RunConfig, teacher: Path, run_dir: Path, device: str, precision: str, n_student: int,
                       log):
    from kiln.run.load import load
    from kiln.train.objectives import DistillLM

    model, _, tcfg = load(teacher, cfg.distill.checkpoint, device=device)
    if tcfg.model.arch != "decoder" or tcfg.model.vocab_size != cfg.model.vocab_size:
        raise KilnError(f"distill.teacher {teacher}: a {tcfg.model.arch} with vocabulary {tcfg.model.vocab_size}; "
                        f"the student is a decoder with vocabulary {cfg.model.vocab_size} (they must match)")
    _check_same_tokenizer(teacher, run_dir, "distill.teacher")
    model.requires_grad_(False)
    if precision == "bf16":  # the teacher only runs forward: bf16 weights, half the bytes
        model.to(torch.bfloat16)
    n_teacher = sum(p.numel() for p in model.parameters())
    log(f"distill: teacher {teacher} ({n_teacher / 1e6:.2f}M parameters) -> student {n_student / 1e6:.2f}M "
        f"({n_teacher / max(n_student, 1):.1f}x smaller); alpha {cfg.distill.alpha}, temperature "
        f"{cfg.distill.temperature}")
    return DistillLM(model, cfg.distill.alpha, cfg.distill.temperature)


def sampling_model(model: torch.nn.Module, cfg: RunConfig, device: str) -> torch.nn.Module | None:
    """A plain module to generate from: the unwrapped model, or under FSDP a fresh one loaded with the
    gathered weights (on rank 0; the gathering is a collective, so call this on every rank)."""
    from kiln.run.checkpoint import unwrap
    from kiln.train.distributed import full_model_state, is_sharded

    plain = unwrap(model)
    if not is_sharded(plain):
        return plain
    state = full_model_state(plain)
    if state is None:
        return None
    fresh = Transformer(cfg.model).to(device)
    fresh.load_state_dict(state, strict=False)  # a tied head is not stored separately
    return fresh.eval()


def pretrain_from_cli(cfg: RunConfig, resume: str | None) -> Path:
    """`kiln pretrain`: the loaded config (the CLI reads it before importing this module), in or out of torchrun."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with leave_process_group_after():
        return run_pretrain(cfg, resume=resume)


def distill_from_cli(teacher: str, overrides: list[str]) -> Path:
    """`kiln distill TEACHER_RUN [--section.key VALUE ...]`: the teacher's own recipe (data, schedule) for a
    student whose shape the overrides set, trained against the teacher's distributions."""
    teacher_dir = Path(teacher)
    if not (teacher_dir / "config.yaml").is_file():
        raise KilnError(f"{teacher_dir} is not a kiln run folder (no config.yaml)")
    cfg = load_config(teacher_dir / "config.yaml", ["--out", "", "--distill.teacher", str(teacher_dir), *overrides])
    if not any(o == "--name" or o.startswith("--name=") for o in overrides):
        cfg.name = f"{cfg.name}-student"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with leave_process_group_after():
        return run_pretrain(cfg)

