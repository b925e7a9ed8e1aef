"""The Python API; every CLI verb is one of these functions."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.config import RunConfig, load_config
from kiln.errors import KilnError
from kiln.model.transformer import Transformer
from kiln.train.checkpoint import find_checkpoint, load_weights, weights_prefix


def load_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").is_file() and not (run_dir / "config.yaml").is_file():
        run_dir = run_dir.parent.parent  # a checkpoint folder inside a run
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise KilnError(f"{run_dir} is not a kiln run folder (no config.yaml)")
    return load_config(cfg_file)


def load(run_dir: str | Path, which: str = "latest", device: str = "cpu", quantized_ok: bool = True):
    """(model, tokenizer or None, config) from a run folder; `which` is latest, best, or a checkpoint path.
    quantized_ok=False: refuse a `kiln quantize` run (for commands that train or export float weights)."""
    run_dir = Path(run_dir)
    ckpt = find_checkpoint(run_dir, which)
    cfg = load_run_config(run_dir if (run_dir / "config.yaml").is_file() else ckpt)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model = model.to_empty(device=device)  # no random init of weights we are about to overwrite
    _rebuild_buffers(model, cfg)
    meta = _checkpoint_meta(ckpt)
    if meta.get("quantization"):  # a `kiln quantize` run: int8 modules, then its weights
        from kiln.compress.quantize import quantize_model

        if not quantized_ok:
            raise KilnError(f"{run_dir} holds {meta['quantization']} weights (kiln quantize): use its source run "
                            f"{meta.get('source', '')} here".rstrip())

        quantize_model(model, calibrate=False)
    load_weights(model, ckpt / "model.safetensors", prefix=weights_prefix(cfg))
    model.eval()
    tok_file = (ckpt.parent.parent / "tokenizer.json")
    tokenizer = None
    if tok_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_file))
    return model, tokenizer, cfg


def _checkpoint_meta(ckpt: Path) -> dict:
    import json

    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _rebuild_buffers(model: Transformer, cfg: RunConfig) -> None:
    """Non-persistent buffers are not in the weights file: recompute them after a meta-device build."""
    from kiln.model.transformer import rope_tables, sinusoidal_table

    for stack in [s for s in (model.encoder, model.decoder) if s is not None]:
        m = cfg.model
        if m.position == "rope":
            cos, sin = rope_tables(m.head_dim, m.context_length, m.rope_theta)
            stack.rope_cos, stack.rope_sin = cos, sin
        if m.position == "sinusoidal":
            stack.embed.sinusoid = sinusoidal_table(m.context_length, m.d_model)


def sample(run_dir: str | Path, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, seed: int | None = None, greedy: bool = False,
           which: str = "latest", stop: list[str] | None = None, precision: str = "auto",
           num_beams: int = 1, device: str = "auto") -> str:
    """Text continuing `prompt`. Generation ends at max_new_tokens or at the first of the `stop` strings
    (the returned text ends right before it). num_beams > 1: beam search (sampling settings ignored; stop
    strings cut the best beam's text afterwards)."""
    from kiln.train.pretrain import resolve_device
    from kiln.train.precision import choose_precision

    if device == "auto" and _checkpoint_meta(find_checkpoint(Path(run_dir), which)).get("quantization"):
        device = "cpu"  # int8 weight-only kernels (kiln quantize) are CPU kernels
    device = resolve_device(device, what="device")
    model, tokenizer, cfg = load(run_dir, which, device=device)
    if choose_precision(precision, device)[0] == "bf16":  # decoding is memory-bound: half the bytes per token
        for p in model.parameters():  # parameters only: position tables (RoPE, sinusoids) stay fp32
            if p.is_floating_point():  # int8 weights of a quantized run stay int8
                p.data = p.data.to(torch.bfloat16)
    if tokenizer is None:
        raise KilnError(f"{run_dir}: no tokenizer.json; cannot encode a text prompt")
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise KilnError("the prompt encodes to no tokens")
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = [s for s in (stop or []) if s]

    def hit_stop(new_ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([any(s in tokenizer.decode(row.tolist()) for s in stop) for row in new_ids],
                            device=new_ids.device)

    if num_beams < 1:
        raise KilnError(f"num_beams must be >= 1, got {num_beams}")
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         greedy=greedy, generator=gen, stop=hit_stop if stop and num_beams == 1 else None,
                         num_beams=num_beams)
    text = tokenizer.decode(out[0, len(ids):].tolist())
    cut = min((text.index(s) for s in stop if s in text), default=len(text))
    return tokenizer.decode(ids) + text[:cut]


def pretrain(config: str | Path | RunConfig | None = None, overrides: list[str] | dict | None = None,
             resume: str | Path | None = None) -> Path:
    """Train a model from a config (file, RunConfig or None for the default recipe). Returns the run folder."""
    from kiln.train.pretrain import run_pretrain

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return run_pretrain(cfg, resume=resume)


def prepare_data(config: str | Path | None = None, overrides: list[str] | dict | None = None,
                 out: str | Path = "data/prepared") -> dict:
    from kiln.data.prepare import prepare

    cfg = load_config(config, overrides)
    return prepare(cfg.data, Path(out), seed=cfg.seed)


def evaluate(run_dir: str | Path, file: str | Path, out: str | Path | None = None, which: str = "best", *,
             stride: int = 0, batch_size: int = 8, num_beams: int | None = None, device: str = "auto",
             log=print) -> dict:
    """`kiln eval`: score a run on a file, by the kind of run. A pretraining run: loss, perplexity and bits per
    byte of a text (masked-token accuracy for masked LM); a classifier (or "RUN1,RUN2,...": their ensemble):
    accuracy, precision/recall/F1 and plots on a labelled file; a seq2seq run: BLEU/chrF or ROUGE on a pair
    file. Returns the metrics, also written as JSON (default RUN_DIR/eval/<FILE stem>.json)."""
    run = Path(run_dir)
    if ("," in str(run_dir) and not run.exists()) or (run / "classify.yaml").is_file():
        from kiln.train.classify import evaluate_file

        return evaluate_file(run_dir, file, out, which, log=log)
    if (run / "seq2seq.yaml").is_file():
        from kiln.train.seq2seq import evaluate_pairs

        return evaluate_pairs(run, file, out, which, num_beams, log=log)
    if (run / "config.yaml").is_file():
        from kiln.eval.lm import evaluate_text

        return evaluate_text(run, file, out, which, stride, batch_size, device, log=log)
    if not run.exists():
        raise KilnError(f"run folder not found: {run}")
    raise KilnError(f"{run} is not a kiln run folder (no config.yaml, classify.yaml or seq2seq.yaml)")
