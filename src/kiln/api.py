"""The Python API; every CLI verb is one of these functions (kiln/cli.py's handlers call them).

Imports are made inside the functions: importing this module costs no torch, so the command line can check what
it reads (a config, a flag) before the ~3 s of torch and the verb's own code.
"""

from __future__ import annotations

from pathlib import Path

from kiln.config import RunConfig, load_config
from kiln.errors import KilnError


def __getattr__(name):  # the public face of run loading, imported when first asked for (it imports torch)
    if name in ("checkpoint_meta", "load_run_config"):
        from kiln.run import load as run_load

        return getattr(run_load, name)
    raise AttributeError(name)


def load(run_dir: str | Path, which: str = "latest", device: str = "cpu", quantized_ok: bool = True):
    """A run's model, by its kind (run.json): a pretraining run (or a checkpoint folder, an imported Hugging Face
    model) gives (model, tokenizer or None, RunConfig); a fine-tuned run what its task's `load` gives:
    classify (model, tokenizer, ClassifyConfig, labels), seq2seq (model, codec, Seq2SeqConfig, meta)."""
    from kiln.run import load as run_load
    from kiln.run.folder import run_kind

    run = Path(run_dir)
    if (run / "model.safetensors").is_file() or run_kind(run) == "pretrain":
        return run_load.load(run, which, device, quantized_ok)
    from kiln import tasks

    return tasks.get(run_kind(run)).load(run, which, device)


def sample(run_dir: str | Path, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, seed: int | None = None, greedy: bool = False,
           which: str = "latest", stop: list[str] | None = None, precision: str = "auto",
           num_beams: int = 1, device: str = "auto") -> str:
    """Text continuing `prompt`. Generation ends at max_new_tokens or at the first of the `stop` strings
    (the returned text ends right before it). num_beams > 1: beam search (sampling settings ignored; stop
    strings cut the best beam's text afterwards)."""
    import torch

    from kiln.data.tokenizer import encode_text
    from kiln.model.generation_settings import check_generation
    from kiln.run.load import load_for_decoding

    check_generation(max_new_tokens, temperature, top_k, top_p, num_beams)  # before the model is loaded
    model, tokenizer, cfg, device, _ = load_for_decoding(run_dir, which, device, precision)
    if tokenizer is None:
        raise KilnError(f"{run_dir}: no tokenizer.json; cannot encode a text prompt")
    ids = encode_text(tokenizer, prompt, "--prompt")
    if not ids:
        raise KilnError("the prompt encodes to no tokens")
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = [s for s in (stop or []) if s]

    def hit_stop(new_ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([any(s in tokenizer.decode(row.tolist()) for s in stop) for row in new_ids],
                            device=new_ids.device)

    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         greedy=greedy, generator=gen, stop=hit_stop if stop and num_beams == 1 else None,
                         num_beams=num_beams)
    text = tokenizer.decode(out[0, len(ids):].tolist())
    cut = min((text.index(s) for s in stop if s in text), default=len(text))
    return tokenizer.decode(ids) + text[:cut]


def chat(run_dir: str | Path, message: str | None = None, system: str | None = None, max_new_tokens: int = 512,
         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
         which: str = "latest", device: str = "auto", precision: str = "auto") -> str:
    """`kiln chat`: the reply to `message` (streamed to stdout, returned), or, without one, a conversation in the
    terminal. The run's chat template (chat_template.jinja; ChatML when it has none) renders the turns; a reply
    ends at the template's end-of-turn token. At temperature 0 it is what /v1/chat/completions answers."""
    from kiln.model.generation_settings import check_generation

    check_generation(max_new_tokens, temperature, top_k, top_p)  # before the model is loaded
    from kiln.serve.chat import chat as converse

    return converse(run_dir, message, system, max_new_tokens, temperature, top_k, top_p, seed, which, device,
                    precision)


def pretrain(config: str | Path | RunConfig | None = None, overrides: list[str] | dict | None = None,
             resume: str | Path | None = None, quiet: bool = False) -> Path:
    """Train a model from a config (file, RunConfig or None for the default recipe), or continue the stopped run
    folder `resume` exactly (its own config.yaml; overrides still apply). Returns the run folder."""
    from kiln.tasks.driver import train
    from kiln.tasks.lm import TASK

    if not isinstance(config, RunConfig):
        config = load_config(Path(resume) / "config.yaml" if resume is not None and config is None else config,
                             overrides)
    return train(TASK, config, quiet=quiet, resume=resume)


def distill(teacher: str | Path, overrides: list[str] | dict | None = None, quiet: bool = False) -> Path:
    """A student trained against the teacher run's distributions on the teacher's own recipe (data,
    schedule); the overrides set its shape. Returns the student's run folder."""
    from kiln.tasks.driver import train
    from kiln.tasks.lm import TASK, distill_config

    return train(TASK, distill_config(str(teacher), overrides), quiet=quiet)


def finetune(task: str, config: str | Path | None = None, overrides: list[str] | dict | None = None,
             quiet: bool = False, resume: str | Path | None = None) -> Path:
    """Fine-tune a task ("classify", "seq2seq", ...) from a config file (or its config object) and overrides,
    or continue the stopped run folder `resume` exactly (its own config; overrides still apply). Returns the
    run folder."""
    from kiln import tasks
    from kiln.tasks.driver import recipe_for, train

    t = tasks.get(task)
    cfg = config if isinstance(config, t.config_cls) else load_config(recipe_for(t, config, resume), overrides,
                                                                        cls=t.config_cls)
    return train(t, cfg, quiet=quiet, resume=resume)


def prepare_data(config: str | Path | None = None, overrides: list[str] | dict | None = None,
                 out: str | Path = "data/prepared") -> dict:
    """`kiln data prepare`: clean, tokenize and shard the config's data into `out`; returns the manifest."""
    cfg = load_config(config, overrides)  # a mistake in it before the preparation's imports
    from kiln.data.prepare import prepare

    return prepare(cfg.data, Path(out), seed=cfg.seed)


def evaluate(run_dir: str | Path, file: str | Path, out: str | Path | None = None, which: str = "best", *,
             stride: int = 0, batch_size: int = 8, num_beams: int | None = None, device: str = "auto",
             benchmark: str | None = None, chat: bool = False, max_new_tokens: int = 32, log=print) -> dict:
    """`kiln eval`: score a run on a file, by the kind of run. A pretraining run: loss, perplexity and bits per
    byte of a text (masked-token accuracy for masked LM); a classifier (or "RUN1,RUN2,...": their ensemble):
    accuracy, precision/recall/F1 and plots on a labelled file; a seq2seq run: BLEU/chrF or ROUGE on a pair
    file; a decoder on a benchmark .jsonl (kiln.eval.benchmarks: `benchmark` a layout or "auto", else found by
    its fields): acc and acc_norm as lm-evaluation-harness computes them, or exact match; `chat` wraps each
    question in the run's chat template. Returns the metrics, also written as JSON (default
    RUN_DIR/eval/<FILE stem>.json)."""
    from kiln import tasks
    from kiln.run.folder import run_kind

    run = Path(run_dir)
    kind = "classify" if ("," in str(run_dir) and not run.exists()) else run_kind(run)  # a,b,c: an ensemble
    if kind not in ("pretrain", "chat"):
        from kiln.data.benchmarks import sniff

        if benchmark or chat or sniff(file):
            raise KilnError(f"{run_dir} is a {kind} run: a benchmark is scored by a decoder (a pretraining or chat "
                            "run)")
    extra = ({"benchmark": benchmark, "chat": chat, "max_new_tokens": max_new_tokens}
             if kind in ("pretrain", "chat") else {})
    return tasks.get(kind).evaluate_file(run_dir, file, out, which, log=log, num_beams=num_beams, stride=stride,
                                         batch_size=batch_size, device=device, **extra)


def predict(run_dir: str | Path, file: str | Path, out: str | Path | None = None, which: str = "best",
            log=print) -> Path:
    """`kiln predict`: a fine-tuned run's predictions for a file (classifier: labels and probabilities as CSV;
    "RUN1,RUN2,..." for their ensemble). Returns the file written."""
    from kiln import tasks
    from kiln.run.folder import run_kind

    run = Path(run_dir)
    kind = "classify" if ("," in str(run_dir) and not run.exists()) else run_kind(run)
    from kiln.tasks.base import Task

    task = tasks.get(kind)
    if type(task).predict_file is Task.predict_file:
        able = ", ".join(n for n in tasks.REGISTRY if type(tasks.get(n)).predict_file is not Task.predict_file)
        hint = ("a pretraining run: fine-tune it first (`kiln finetune TASK --init RUN`), or sample from it with "
                "`kiln generate`") if kind == "pretrain" else f"a {kind} run: kiln eval and kiln translate use it"
        raise KilnError(f"{run} is {hint}; kiln predict takes a fine-tuned {' / '.join(able.split(', '))} run")
    return task.predict_file(run_dir, file, out, which, log=log)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, queue: int = 64,
          which: str | None = None, device: str = "auto", precision: str = "auto") -> None:
    """`kiln serve`: an HTTP server for a run until SIGINT/SIGTERM (kiln.serve)."""
    from kiln.serve import serve as serve_run

    serve_run(run_dir, host, port, max_batch, queue, which, device, precision)


def models() -> list[dict]:
    """`kiln models`: the named model presets, each with its shape and parameter count."""
    import torch

    from kiln.model.config import PRESETS, preset
    from kiln.model.transformer import Transformer

    rows = []
    for name in PRESETS:
        cfg = preset(name).resolve()
        with torch.device("meta"):
            n = Transformer(cfg).num_parameters()
        rows.append({"preset": name, "arch": cfg.arch, "n_layer": cfg.n_layer, "d_model": cfg.d_model,
                     "n_head": cfg.n_head, "params": n})
    return rows


def compare(runs: list[str | Path], metrics: list[str], out: str | Path = "compare.png", x: str = "step",
            labels: list[str] | None = None) -> tuple[Path, list[dict]]:
    """`kiln viz compare`: several runs' curves on one PNG; returns it and each run's last and best values."""
    from kiln.report.plots import compare_runs

    return compare_runs([Path(r) for r in runs], metrics, Path(out), x, labels)


def attention(run_dir: str | Path, text: str, out: str | Path | None = None) -> Path:
    """`kiln viz attention`: a PNG grid (layers x heads) of a pretraining run's attention maps for `text`."""
    from kiln.eval.attention_maps import viz_attention

    return viz_attention(run_dir, text, out)


def prune(run_dir: str | Path, out: str | Path, ffn_keep: float, which: str = "latest") -> dict:
    """`kiln prune`: keep a share of the feed-forward neurons, into a new run folder; returns the report."""
    from kiln.compress.prune import prune_run

    return prune_run(run_dir, out, ffn_keep, which=which)


def quantize(run_dir: str | Path, out: str | Path, which: str = "latest") -> dict:
    """`kiln quantize`: int8 weight-only quantization into a new run folder; returns the report."""
    from kiln.compress.quantize import quantize_run

    return quantize_run(run_dir, out, which=which)


def merge(run_dir: str | Path, out: str | Path, which: str = "best") -> Path:
    """`kiln merge`: a LoRA run's adapters folded into its base, as a new run folder."""
    from kiln.compress.merge import merge_run

    return merge_run(run_dir, out, which=which)


def import_run(src: str | Path, run_dir: str | Path, format: str = "hf") -> Path:
    """`kiln import hf SRC RUN_DIR`: a kiln run folder from a Hugging Face model folder; `kiln import gguf
    FILE.gguf RUN_DIR`: from a llama.cpp / Ollama GGUF file (tokenizer and chat template included)."""
    if format == "gguf":
        from kiln.interop.gguf_read import import_gguf

        return import_gguf(src, run_dir)
    if format != "hf":
        raise KilnError(f"import format {format!r}: kiln imports hf, gguf")
    from kiln.interop.hf import import_hf

    return import_hf(src, run_dir)


def export(run_dir: str | Path, out: str | Path, format: str = "hf", which: str | None = None,
           int8: bool = False, dtype: str = "f32") -> None:
    """`kiln export`: hf (a transformers folder), onnx (checked and measured, OUT/report.json; int8: also
    model.int8.onnx) or peft (a LoRA run's adapters, its base in OUT/base). which: default latest (hf),
    best (peft; onnx: a classifier). gguf: `out` is the .gguf file (dtype f32, f16, bf16 or q8_0), an Ollama
    Modelfile beside it."""
    if format == "gguf":
        from kiln.interop.gguf_write import export_gguf

        export_gguf(run_dir, out, dtype, which=which or "latest")
        return
    if format == "peft":
        from kiln.interop.peft import export_peft

        export_peft(run_dir, out, which=which or "best")
    elif format == "onnx":
        from kiln.interop.onnx import export_onnx
        from kiln.tasks.classify import load_splits  # the classifier's own reading of its data (test accuracy)

        export_onnx(run_dir, out, int8=int8, which=which, read_splits=load_splits)
    elif format == "hf":
        from kiln.interop.hf import export_hf

        export_hf(run_dir, out, which=which or "latest")
    else:
        raise KilnError(f"export format {format!r}: one of hf, onnx, peft, gguf")


def translate(run_dir: str | Path, texts: list[str] | None = None, file: str | Path | None = None,
              num_beams: int | None = None, which: str = "best", out: str | Path | None = None) -> None:
    """`kiln translate`: a seq2seq run's outputs for `texts` and/or a file, printed or written to `out` as TSV
    (with BLEU/chrF or ROUGE when the file has references)."""
    from kiln.tasks.seq2seq import translate_from_cli

    translate_from_cli(run_dir, texts, file, num_beams, which, out)
