"""The verbs of the `kiln` command: VERBS (each verb's help and arguments) and the parser built from it.

The handlers that run them are in kiln.cli (HANDLERS); --help's tables of config keys come from the config
dataclasses (kiln.config.config_help, a task's help_rows), built only for the command being asked about.
"""

from __future__ import annotations

import argparse

from kiln.cli_checks import Parser


def _keys_epilog(rows) -> str:
    """--help's table of config keys (config_help / a task's help_rows)."""
    width = max(len(r[0]) for r in rows)
    return "\n".join(["config keys (set in the YAML file or override as --section.key VALUE):"] +
                     [f"  {flag:<{width}}  {help} [default {default}]" for flag, default, help in rows])


def _config_epilog() -> str:
    from kiln.config import config_help

    return _keys_epilog(config_help())


def _a(*flags, **kw) -> tuple[tuple, dict]:
    """One argument of a verb, as add_argument takes it."""
    return flags, kw


def _finetune_tasks(ft: argparse.ArgumentParser, argv: list[str]) -> None:
    """`kiln finetune TASK`, one sub-command per task of the registry. The task's module (and its config's help
    rows) only for the --help of the task named: `kiln --help` and a mistake in a recipe stay light."""
    from kiln import tasks

    ft_sub = ft.add_subparsers(dest="finetune_verb", metavar="TASK")
    wants_help = bool({"-h", "--help"} & set(argv))
    for name, (_, summary) in tasks.REGISTRY.items():
        task = tasks.get(name) if argv[:2] == ["finetune", name] and wants_help else None
        kw = {"help": summary, "epilog": _keys_epilog(task.help_rows()), "description": task.usage} if task else \
            {"help": summary}
        _add(ft_sub, name, kw, [
            _a("config", nargs="?", help=f"recipe YAML (e.g. {task.example})" if task else "recipe YAML"),
            _a("--resume", metavar="RUN_DIR", help="continue a stopped run exactly where its last checkpoint left "
                                                   "it (the run's own recipe; overrides still apply)")], argv)


CHECKPOINT = "latest, best, or a checkpoint folder"
DEVICE = "auto (a CUDA GPU when there is one) | cpu | cuda[:N]"

# verb -> (add_parser keywords, its arguments | (dest, metavar, {sub-command: (keywords, arguments)}) | a function
# that adds its sub-commands). An epilog (a callable: built per parse) is laid out as written; the rest wraps.
VERBS = {
    "pretrain": ({"help": "pretrain a model from a config: causal LM, masked LM or ELECTRA (--objective)",
                  "epilog": _config_epilog,
                  "description": "kiln pretrain [CONFIG.yaml] [--section.key VALUE ...]"}, [
        _a("config", nargs="?", help="recipe YAML (default: the embedded tiny-Shakespeare recipe)"),
        _a("--resume", metavar="RUN_DIR", help="continue a run exactly where its last checkpoint stopped")]),
    "data": ({"help": "data preparation"}, ("data_verb", "ACTION", {
        "prepare": ({"help": "clean, tokenize and shard text into OUT", "epilog": _config_epilog,
                     "description": "kiln data prepare [CONFIG.yaml] --out DIR [--data.source PATH ...]"}, [
            _a("config", nargs="?", help="recipe YAML (its data section is used)"),
            _a("--out", required=True, help="output folder for shards, tokenizer.json and manifest.json")])})),
    "generate": ({"help": "generate text from a trained run"}, [
        _a("run_dir"), _a("--prompt", default="\n"), _a("--max-new-tokens", type=int, default=200),
        _a("--temperature", type=float, default=0.8, help="0 = greedy"),
        _a("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)"),
        _a("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)"),
        _a("--seed", type=int, default=None), _a("--checkpoint", default="latest", help=CHECKPOINT),
        _a("--stop", action="append", default=[], help="stop before this string (repeatable)"),
        _a("--num-beams", type=int, default=1, help="beam search with this many beams (1 = sample/greedy)"),
        _a("--precision", default="auto", choices=("auto", "fp32", "bf16"),
           help="auto: bf16 where the CPU computes it natively (decoding ~1.8x faster), else fp32"),
        _a("--device", default="auto", help=DEVICE)]),
    "serve": ({"help": "HTTP server for a run: OpenAI-style /v1/completions (streaming) for a language model, "
                       "/v1/classify for a classifier, a playground page at /"}, [
        _a("run_dir"), _a("--host", default="127.0.0.1", help="address to listen on (default: this machine only)"),
        _a("--port", type=int, default=8000, help="0 = any free port (the URL is printed)"),
        _a("--max-batch", type=int, default=8, help="requests decoded together in one batch"),
        _a("--queue", type=int, default=64, help="requests that may wait; beyond that, HTTP 503"),
        _a("--checkpoint", default=None, help="latest, best, or a checkpoint folder (default: latest for a "
                                              "language model, best for a classifier)"),
        _a("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="as kiln generate's"),
        _a("--device", default="auto", help=DEVICE)]),
    "chat": ({"help": "chat with a decoder run in the terminal, its chat template applied (ChatML when it has "
                      "none): the reply streams, /reset starts again; -m MESSAGE answers once, for scripts"}, [
        _a("run_dir"), _a("-m", "--message", default=None, help="print the reply to this one message and exit"),
        _a("--system", default=None, help="a system prompt"),
        _a("--max-new-tokens", type=int, default=512, help="longest reply in tokens (and the context's room)"),
        _a("--temperature", type=float, default=0.0, help="0 = greedy (the default)"),
        _a("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)"),
        _a("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)"),
        _a("--seed", type=int, default=None), _a("--checkpoint", default="latest", help=CHECKPOINT),
        _a("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="as kiln generate's"),
        _a("--device", default="auto", help=DEVICE)]),
    "models": ({"help": "list the named model presets with parameter counts"}, []),
    "viz": ({"help": "plots of a run"}, ("viz_verb", "WHAT", {
        "attention": ({"help": "PNG grid of attention maps (layers x heads) for a text"}, [
            _a("run_dir"), _a("--text", required=True),
            _a("--out", default=None, help="PNG path (default RUN_DIR/plots/attention.png)")]),
        "compare": ({"help": "several runs' curves on one PNG (loss, val metrics), with the last and best value "
                             "of each"}, [
            _a("runs", nargs="+", help="run folders (any kind: pretrain, finetune, distill)"),
            _a("--metric", default="loss,val_loss", help="comma-separated metrics.csv columns, one panel each "
                                                         "(e.g. val_loss, val_accuracy, val_bleu)"),
            _a("--x", default="step", help="step | tokens | elapsed (minutes)"),
            _a("--labels", default=None, help="comma-separated legend names (default: the folder names)"),
            _a("--out", default="compare.png", help="PNG path (default ./compare.png)")])})),
    "distill": ({"help": "train a smaller student on a teacher run's data and next-token distributions (the "
                         "teacher's recipe; override the student's shape)",
                 "epilog": "example: kiln distill runs/demo-... --model.n_layer 2 --model.d_model 64\n"
                           "distill.* keys: alpha (weight of the KL term), temperature, checkpoint"}, [
        _a("teacher", help="the teacher's run folder")]),
    "prune": ({"help": "structured pruning of feed-forward neurons into a new, smaller run, with the size / val "
                       "loss / decoding speed trade-off",
               "epilog": "recover accuracy with a short distillation: kiln distill RUN_DIR --init OUT"}, [
        _a("run_dir"), _a("--out", required=True, help="new run folder for the pruned model"),
        _a("--ffn-keep", type=float, required=True, help="share of feed-forward neurons kept (0-1]"),
        _a("--checkpoint", default="latest", help=CHECKPOINT)]),
    "quantize": ({"help": "int8 weight-only quantization of a run into a new run folder, with the size / val "
                          "loss / decoding speed trade-off"}, [
        _a("run_dir"), _a("--out", required=True, help="new run folder for the quantized model"),
        _a("--checkpoint", default="latest", help=CHECKPOINT)]),
    "merge": ({"help": "fold a LoRA run's adapters into its frozen base: a run folder with full weights that "
                       "loads, evaluates, exports and serves like any run"}, [
        _a("run_dir", help="a run trained with train.lora.rank > 0"),
        _a("--out", required=True, help="new run folder for the merged model"),
        _a("--checkpoint", default="best", help="best (the newest when the run has none), latest, or a "
                                                "checkpoint folder")]),
    "import": ({"help": "import a checkpoint from another format"}, [
        _a("format", choices=["hf", "gguf"], help="hf: a transformers folder; gguf: a llama.cpp / Ollama file "
                                                   "(llama, qwen2; tokenizer and chat template from its metadata)"),
        _a("src"), _a("run_dir")]),
    "export": ({"help": "export a run to another format: hf (transformers folder) or onnx (a classifier, "
                        "image or speech run, or a language model, for onnxruntime, checked: OUT/report.json)"}, [
        _a("format", choices=["hf", "onnx", "peft", "gguf"], help="peft: a LoRA run's adapters (adapter_config.json "
                                                                  "+ adapter_model.safetensors) and its frozen base in "
                                                                  "OUT/base (transformers); gguf: OUT is the .gguf file "
                                                                  "(llama.cpp, Ollama: a Modelfile beside it)"),
        _a("run_dir"), _a("out_dir"),
        _a("--dtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"), help="gguf: the matrices' type"),
        _a("--int8", action="store_true", help="onnx: also model.int8.onnx (onnxruntime quantize_dynamic)"),
        _a("--checkpoint", default=None, help="best, latest or a checkpoint folder (default: latest; onnx: best "
                                              "for a classifier)")]),
    "finetune": ({"help": "fine-tune a pretrained model on a task"}, _finetune_tasks),
    "translate": ({"help": "outputs of a seq2seq run for texts or a file"}, [
        _a("run_dir", help="a `kiln finetune seq2seq` run folder"),
        _a("--text", action="append", help="a source text (repeatable)"),
        _a("--file", help=".txt (one source per line) or .tsv/.csv/.jsonl with the run's source column (BLEU/chrF "
                          "or ROUGE are printed when it has the target column too)"),
        _a("--out", help="write a TSV (source, reference, output) instead of printing"),
        _a("--num-beams", type=int, default=None, help="1 = greedy (default: the run's seq2seq.num_beams)"),
        _a("--checkpoint", default="best", help="best, latest, or a checkpoint folder")]),
    "predict": ({"help": "a fine-tuned run's predictions for a file: classes with probabilities (classify, "
                         "image), answers with spans (qa), entities (tokens)"}, [
        _a("run_dir", help="a `kiln finetune classify|qa|tokens|image` run folder, or RUN1,RUN2,... for an "
                           "ensemble of classifiers"),
        _a("file", help="inputs as the run was trained on them: a .csv/.tsv/.jsonl text table (classify), SQuAD "
                        ".json/.jsonl (qa), CoNLL/.jsonl (tokens), an image folder/IDX/CSV (image)"),
        _a("--out", help="output file (default RUN_DIR/predictions/<FILE stem>.<csv|jsonl>)"),
        _a("--checkpoint", default="best", help="best, latest, or a checkpoint folder")]),
    "eval": ({"help": "metrics of a run on a file: perplexity (pretraining runs), accuracy/F1 (classifiers), "
                      "BLEU/chrF or ROUGE (seq2seq); table + JSON",
              "description": "Score a run on a file it did not train on. A pretraining run: loss, perplexity and "
              "bits per byte on a text file (.txt, a folder of .txt, .jsonl/.csv with the run's text column); "
              "masked-token accuracy for masked LM. A classifier run (or RUN1,RUN2,... for their ensemble): "
              "accuracy, precision/recall/F1, confusion matrix, ROC/PR on a labelled .csv/.tsv/.jsonl. A "
              "seq2seq run: BLEU/chrF (translate) or ROUGE (summarize) on a pair file, outputs written beside "
              "the JSON."}, [
        _a("run_dir", help="a run folder (pretrain, finetune classify or finetune seq2seq), or RUN1,RUN2,... "
                           "(classifiers) for their ensemble"),
        _a("file", help="the text, labelled or pair file to score"),
        _a("--out", help="output JSON (default RUN_DIR/eval/<FILE stem>.json; plots beside it)"),
        _a("--checkpoint", default="best", help="best (latest when the run has none), latest, or a checkpoint "
                                                "folder"),
        _a("--stride", type=int, default=0, help="causal LM: tokens each window advances (default: the context "
                                                 "length, windows that do not overlap; smaller = more context per "
                                                 "token, slower)"),
        _a("--batch-size", type=int, default=8, help="pretraining runs: windows per forward pass"),
        _a("--num-beams", type=int, default=None, help="seq2seq: beams (default: the run's)"),
        _a("--device", default="auto", help="pretraining runs: auto | cpu | cuda[:N]"),
        _a("--benchmark", nargs="?", const="auto", default=None, choices=("auto", "mc", "hellaswag", "arc", "generative"),
           help="score FILE as a benchmark: multiple choice (acc, acc_norm as lm-evaluation-harness) or generative "
                "exact match; the layout by its fields (auto) or named. A .jsonl whose rows have a benchmark layout "
                "is scored as one without this flag"),
        _a("--chat", action="store_true", help="benchmarks: wrap each question as a user turn of the run's "
                                               "chat_template.jinja (default: the plain prompt, as lm-eval)"),
        _a("--max-new-tokens", type=int, default=32, help="generative benchmarks: tokens generated per answer")]),
}


def _add(sub, name: str, kw: dict, args, argv: list[str]) -> None:
    """The sub-command `name` of `sub`, as its VERBS row says."""
    if callable(kw.get("epilog")):
        kw = {**kw, "epilog": kw["epilog"]()}
    fmt = argparse.RawDescriptionHelpFormatter if kw.get("epilog") else argparse.HelpFormatter
    p = sub.add_parser(name, formatter_class=fmt, **kw)
    if callable(args):
        args(p, argv)
    elif isinstance(args, tuple):
        dest, metavar, subs = args
        inner = p.add_subparsers(dest=dest, metavar=metavar)
        for sub_name, (sub_kw, sub_args) in subs.items():
            _add(inner, sub_name, sub_kw, sub_args, argv)
    else:
        for flags, arg_kw in args:
            p.add_argument(*flags, **arg_kw)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; `argv` names the command being run, so only its task's help rows are built."""
    p = Parser(prog="kiln", description="From raw text to a trained, evaluated Transformer.",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for name, (kw, args) in VERBS.items():
        _add(sub, name, kw, args, list(argv or []))
    return p
