"""Pretraining as a task on the one driver (kiln.tasks.driver): causal LM, masked LM, ELECTRA and distillation
(`objective:` and `distill.teacher` in the config) over token shards. `kiln pretrain` and `kiln distill` run it.

What differs from a fine-tuning task: the data are token shards prepared *into* the run folder (rank 0 prepares,
the others wait), each rank reads its own windows of every global batch (TokenBatches rank/world_size; the global
batch is counted in tokens, train.batch_tokens), learning rates may scale with the batch (train.lr_scaling), the
batch may ramp up, and the final pass prints a sample instead of scoring a test split.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from kiln.config import RunConfig, dump_yaml, load_config
from kiln.data.batches import TokenBatches, eval_windows
from kiln.errors import KilnError
from kiln.model.transformer import Transformer
from kiln.run.checkpoint import load_weights, weights_prefix
from kiln.run.folder import holds_run
from kiln.tasks.base import Data, Prepared, Task
from kiln.train.objectives import CausalLM, evaluate_lm
from kiln.train.lm_plans import objective_for
from kiln.train.scaling import env_world, scale_batch_and_lr


class PretrainTask(Task):
    name = verb = "pretrain"
    config_cls, config_file = RunConfig, "config.yaml"
    throughput_unit = "tok"
    checks_data = False  # the shards are prepared into the run folder: nothing to compare on a resume

    def check(self, cfg: RunConfig) -> None:
        scale_batch_and_lr(cfg, env_world()[1])  # an impossible global batch, before any work
        spec = objective_for(cfg)
        if cfg.train.lora.rank and cfg.objective == "electra":
            raise KilnError(f"train.lora.rank {cfg.train.lora.rank}: LoRA is for continued pretraining of a model "
                            "with objective clm or mlm (ELECTRA trains a new generator beside it)")
        if cfg.objective == "electra":
            spec.check(cfg)  # a pure config check, before any work (the arch check waits for init's shape)

    def read(self, cfg: RunConfig, log) -> Data:
        return Data({}, {})  # the token shards are prepared into the run folder, in prepare

    def prepare(self, cfg: RunConfig, run_dir: Path, data: Data, device: str, log) -> Prepared:
        rank, world, _ = env_world()
        # a new run adopts init's model shape and tokenizer (a resume has them in its config.yaml already)
        init_ckpt, init_prefix = _init_from(cfg, log) if cfg.init and not holds_run(run_dir) else (None, "")
        teacher = _distill_data(cfg, log) if cfg.distill.teacher else None
        if cfg.data.mixture:
            train_srcs, val_srcs, datasets, manifest = load_mixture(cfg, run_dir)
        else:
            train_src, val_src, manifest = load_data(cfg, run_dir, log)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = int(manifest["vocab_size"])
        elif cfg.model.vocab_size < int(manifest["vocab_size"]):
            raise KilnError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                            f"{manifest['vocab_size']}")
        spec = objective_for(cfg)
        spec.check(cfg)
        plan = spec.prepare(cfg, run_dir, manifest)
        cfg.model.resolve()
        log(dump_yaml(cfg).rstrip())
        model = Transformer(cfg.model).to(device)
        if init_ckpt is not None:
            _check_same_tokenizer(Path(cfg.init), run_dir, "init")
            load_weights(model, init_ckpt / "model.safetensors", prefix=init_prefix)
            log(f"init: weights from {init_ckpt}")
        n_params = model.num_parameters()
        model = spec.wrap(cfg, model, device, log)
        T, B = cfg.model.context_length, cfg.train.batch_size
        objective = CausalLM()

        def windows(src):
            return lambda: (b.to(device) for b in eval_windows(src, T, B, cfg.train.eval_batches))

        def val_loss(m, src) -> dict:
            return evaluate_lm(m, objective, windows(src))

        if cfg.data.mixture:
            from kiln.data.mixture import MixtureTokens

            batches = MixtureTokens(train_srcs, [d.weight for d in datasets], T, B, cfg.seed, rank=rank,
                                    world_size=world, names=[d.name for d in datasets])
            for src in val_srcs:
                list(eval_windows(src, T, B, 1))  # fail early if a val split is shorter than one window
            sizes = ", ".join(f"{d.name} {len(t):,} train / {len(v):,} val"
                              for d, t, v in zip(datasets, train_srcs, val_srcs))
            log(f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters; data (tokens): {sizes}")
            train_cfg, _ = scale_batch_and_lr(cfg, world)
            log(batches.report(cfg.train.max_steps * B * train_cfg.grad_accum * world))

            def evaluate(m) -> dict:  # each dataset's val loss, and their mean weighted like the mixture
                per = {f"val_loss_{d.name}": val_loss(m, src)["val_loss"] for d, src in zip(datasets, val_srcs)}
                mean = sum(d.weight * per[f"val_loss_{d.name}"] for d in datasets)
                return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), **per}
            n_train = sum(len(t) for t in train_srcs)
        else:
            log(f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters; data: {len(train_src):,} train / "
                f"{len(val_src):,} val tokens")
            batches = TokenBatches(train_src, T, B, cfg.seed, rank=rank, world_size=world)
            list(eval_windows(val_src, T, B, 1))  # fail early if val is shorter than one window

            def evaluate(m) -> dict:
                return val_loss(m, val_src)
            n_train = len(train_src)
        train_objective, next_batch = objective, batches.batch  # evaluation: plain cross-entropy on the val split
        if teacher is not None:
            train_objective = _teacher_objective(cfg, teacher, run_dir, device, n_params, log)
        if plan.objective is not None:  # the objective's own loss, batches and validation
            train_objective = plan.objective

            def next_batch(i):  # noqa: F811
                return plan.batch(batches.batch(i), i)

            def evaluate(m) -> dict:  # noqa: F811
                return plan.evaluate(m, windows(val_src))
        return Prepared(model, train_objective, next_batch, n_train, evaluate, "val_loss",
                        {"objective": cfg.objective, "arch": cfg.model.arch}, unit=plan.unit, global_batches=False)

    def schedule(self, cfg: RunConfig, tcfg, steps_per_epoch: int) -> str:
        """The global batch in tokens: grad_accum derived per rank, learning rates scaled (train.scaling)."""
        super().schedule(cfg, tcfg, steps_per_epoch)  # save_every 0: at the end
        if tcfg.eval_every <= 0:  # 0: one evaluation, at the end
            tcfg.eval_every = max(tcfg.max_steps, 1)
        scaled, line = scale_batch_and_lr(cfg, env_world()[1])
        tcfg.grad_accum, tcfg.lr, tcfg.min_lr, tcfg.muon_lr = scaled.grad_accum, scaled.lr, scaled.min_lr, scaled.muon_lr
        return line

    def ramp(self, tcfg, cfg: RunConfig, log):
        """A kiln.train.ramp.BatchRamp when train.batch_ramp_tokens grows the global batch, else None."""
        if not tcfg.batch_ramp_tokens:
            return None
        from kiln.train.ramp import BatchRamp

        if tcfg.grad_accum < 2:
            raise KilnError("train.batch_ramp_tokens needs a global batch of several micro-batches: set "
                            "train.batch_tokens (or train.grad_accum) above one micro-batch per rank")
        power = {"linear": 1.0, "sqrt": 0.5}.get(tcfg.lr_scaling, 0.0)
        log(f"batch ramp: 1 -> {tcfg.grad_accum} micro-batches per step over {tcfg.batch_ramp_tokens:,} "
            f"tokens, lr x (batch / target)^{power:g}")
        return BatchRamp(tcfg.grad_accum, cfg.train.batch_size * cfg.model.context_length * env_world()[1],
                         tcfg.batch_ramp_tokens, power)

    def summary(self, result: dict, trainer) -> dict:
        return {"tokens": result["tokens"], "val_loss": result.get("val_loss")}

    def test(self, cfg: RunConfig, prep: Prepared, model, ckpt: Path, run_dir: Path, log) -> dict:
        """A sample from a decoder (train.sample_tokens), on rank 0."""
        if not (cfg.train.sample_tokens and cfg.model.arch == "decoder" and (run_dir / "tokenizer.json").is_file()):
            return {}
        from tokenizers import Tokenizer

        from kiln.data.tokenizer import encode_text

        tok = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
        try:  # the run is trained and saved: a prompt the tokenizer cannot encode skips the sample, one line
            ids = encode_text(tok, cfg.train.sample_prompt, "train.sample_prompt") or [0]
        except KilnError as e:
            log(f"sample skipped: {e}")
            return {}
        device = next(model.parameters()).device
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        model.eval()
        out = model.generate(torch.tensor([ids], device=device), cfg.train.sample_tokens, temperature=0.8,
                             top_k=50, generator=g)
        log("sample:\n" + tok.decode(out[0].tolist()))
        return {}

    def load(self, run_dir, which: str = "latest", device: str = "cpu"):
        from kiln.run.load import load

        return load(Path(run_dir), which, device)

    def evaluate_file(self, run_dir, file, out=None, which: str = "best", log=print, stride: int = 0,
                      batch_size: int = 8, device: str = "auto", benchmark: str | None = None, chat: bool = False,
                      max_new_tokens: int = 32, **kw) -> dict:
        """`kiln eval` on a text: loss, perplexity, bits per byte (masked-token accuracy for masked LM); on a
        benchmark file (--benchmark, or .jsonl rows of a benchmark layout): acc / acc_norm or exact match."""
        from kiln.data.benchmarks import sniff
        from kiln.eval.lm import evaluate_text

        if benchmark or sniff(file):
            from kiln.eval.benchmarks import evaluate_benchmark

            return evaluate_benchmark(Path(run_dir), file, out, which, chat=chat, layout=benchmark or "auto",
                                      batch_size=batch_size, device=device, max_new_tokens=max_new_tokens, log=log)
        if chat:
            raise KilnError(f"--chat is for benchmark files; {file} is scored as a text")
        return evaluate_text(Path(run_dir), file, out, which, stride, batch_size, device, log=log)


TASK = PretrainTask()


def load_mixture(cfg: RunConfig, run_dir: Path):
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


def _init_from(cfg: RunConfig, log) -> tuple[Path, str]:
    """`init`: take the run's model shape and (unless the data names its own) its tokenizer; return its checkpoint
    and the prefix of the model's weights in it (kiln.run.checkpoint.weights_prefix)."""
    from kiln.run.checkpoint import find_checkpoint
    from kiln.run.load import load_run_config

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
    log(f"init: model shape from {init} ({cfg.model.arch}, {cfg.model.n_layer} layers, d_model "
        f"{cfg.model.d_model}, vocab {cfg.model.vocab_size}); tokenizer "
        f"{cfg.data.tokenizer if not cfg.data.prepared else 'of data.prepared'}")
    return ckpt, weights_prefix(icfg)


def _check_same_tokenizer(source: Path, run_dir: Path, key: str) -> None:
    theirs, ours = source / "tokenizer.json", run_dir / "tokenizer.json"
    if theirs.is_file() and ours.is_file() and theirs.read_bytes() != ours.read_bytes():
        raise KilnError(f"{key} {source}: its tokenizer.json differs from this run's data; prepare the data with "
                        f"--data.tokenizer {theirs}")


def _distill_data(cfg: RunConfig, log) -> Path:
    """Check the teacher run and the distill keys; train on its token shards unless data.prepared names others."""
    teacher = Path(cfg.distill.teacher).expanduser()
    if cfg.distill.augment:
        raise KilnError("distill.augment is for finetune classify; pretraining distills on the token shards")
    if "," in cfg.distill.teacher and not teacher.exists():
        raise KilnError(f"distill.teacher {cfg.distill.teacher!r}: pretraining distills from one teacher run; "
                        f"an ensemble of teachers is for finetune classify")
    if not (teacher / "config.yaml").is_file():
        raise KilnError(f"distill.teacher {teacher} is not a kiln run folder (no config.yaml)")
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
        log(f"distill: training on the teacher's token shards {data}")
    return teacher


def _teacher_objective(cfg: RunConfig, teacher: Path, run_dir: Path, device: str, n_student: int, log):
    from kiln.run.load import load
    from kiln.train.objectives import DistillLM

    model, _, tcfg = load(teacher, cfg.distill.checkpoint, device=device)
    if tcfg.model.arch != "decoder" or tcfg.model.vocab_size != cfg.model.vocab_size:
        raise KilnError(f"distill.teacher {teacher}: a {tcfg.model.arch} with vocabulary {tcfg.model.vocab_size}; "
                        f"the student is a decoder with vocabulary {cfg.model.vocab_size} (they must match)")
    _check_same_tokenizer(teacher, run_dir, "distill.teacher")
    model.requires_grad_(False)
    n_teacher = sum(p.numel() for p in model.parameters())
    log(f"distill: teacher {teacher} ({n_teacher / 1e6:.2f}M parameters) -> student {n_student / 1e6:.2f}M "
        f"({n_teacher / max(n_student, 1):.1f}x smaller); alpha {cfg.distill.alpha}, temperature "
        f"{cfg.distill.temperature}")
    return DistillLM(model, cfg.distill.alpha, cfg.distill.temperature)


def distill_config(teacher: str, overrides: list[str]) -> RunConfig:
    """`kiln distill TEACHER_RUN [--section.key VALUE ...]`: the teacher's own recipe (data, schedule) for a
    student whose shape the overrides set, trained against the teacher's distributions."""
    teacher_dir = Path(teacher)
    if not (teacher_dir / "config.yaml").is_file():
        raise KilnError(f"{teacher_dir} is not a kiln run folder (no config.yaml)")
    cfg = load_config(teacher_dir / "config.yaml", ["--out", "", "--distill.teacher", str(teacher_dir), *overrides])
    if not any(o == "--name" or o.startswith("--name=") for o in overrides):
        cfg.name = f"{cfg.name}-student"
    return cfg


def run_pretrain(cfg: RunConfig, resume: str | Path | None = None, quiet: bool = False) -> Path:
    """Pretrain as `cfg` says (or continue the run folder `resume`) on the one driver; returns the run folder."""
    from kiln.tasks.driver import train

    return train(TASK, cfg, quiet=quiet, resume=resume)
