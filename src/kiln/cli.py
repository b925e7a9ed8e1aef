"""The `kiln` command: parse, build a config, call one function per verb. Nothing else lives here.

Exit codes: 0 success, 2 the user's input is wrong (one line, no traceback; --debug shows it),
1 a bug in kiln, 130 interrupted after a clean save.
"""

from __future__ import annotations

import argparse
import os
import sys

from kiln.cli_checks import (Parser, refuse_a_busy_resume, require_run_folders, resume_hint, torchrun_error_file,
                             unrecognized)
from kiln.errors import KilnError

CONFIG_VERBS = ("pretrain",)


def _config_epilog() -> str:
    from kiln.config import config_help

    rows = config_help()
    width = max(len(r[0]) for r in rows)
    lines = ["config keys (set in the YAML file or override as --section.key VALUE):"]
    lines += [f"  {flag:<{width}}  {help} [default {default}]" for flag, default, help in rows]
    return "\n".join(lines)


def _task_epilog(task) -> str:
    rows = task.help_rows()
    width = max(len(r[0]) for r in rows)
    return "\n".join(["config keys (set in the YAML file or override as --section.key VALUE):"] +
                     [f"  {flag:<{width}}  {help} [default {default}]" for flag, default, help in rows])


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; `argv` names the command being run, so only its task's help rows are built."""
    p = Parser(prog="kiln", description="From raw text to a trained, evaluated Transformer.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    fmt = argparse.RawDescriptionHelpFormatter
    pt = sub.add_parser("pretrain", help="pretrain a model from a config: causal LM, masked LM or ELECTRA "
                        "(--objective)", epilog=_config_epilog(),
                        formatter_class=fmt, description="kiln pretrain [CONFIG.yaml] [--section.key VALUE ...]")
    pt.add_argument("config", nargs="?", help="recipe YAML (default: the embedded tiny-Shakespeare recipe)")
    pt.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly where its last checkpoint stopped")

    data = sub.add_parser("data", help="data preparation")
    data_sub = data.add_subparsers(dest="data_verb", metavar="ACTION")
    dp = data_sub.add_parser("prepare", help="clean, tokenize and shard text into OUT", formatter_class=fmt,
                             epilog=_config_epilog(),
                             description="kiln data prepare [CONFIG.yaml] --out DIR [--data.source PATH ...]")
    dp.add_argument("config", nargs="?", help="recipe YAML (its data section is used)")
    dp.add_argument("--out", required=True, help="output folder for shards, tokenizer.json and manifest.json")

    g = sub.add_parser("generate", help="generate text from a trained run")
    g.add_argument("run_dir")
    g.add_argument("--prompt", default="\n")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--checkpoint", default="latest", help="latest, best, or a checkpoint folder")
    g.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1 = sample/greedy)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 where the CPU computes it natively (decoding ~1.8x faster), else fp32")
    g.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one) | cpu | cuda[:N]")

    sv = sub.add_parser("serve", help="HTTP server for a run: OpenAI-style /v1/completions (streaming) for a "
                        "language model, /v1/classify for a classifier, a playground page at /")
    sv.add_argument("run_dir")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="0 = any free port (the URL is printed)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one batch")
    sv.add_argument("--queue", type=int, default=64, help="requests that may wait; beyond that, HTTP 503")
    sv.add_argument("--checkpoint", default=None, help="latest, best, or a checkpoint folder (default: latest "
                    "for a language model, best for a classifier)")
    sv.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="as kiln generate's")
    sv.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one) | cpu | cuda[:N]")

    sub.add_parser("models", help="list the named model presets with parameter counts")

    viz = sub.add_parser("viz", help="plots of a run")
    viz_sub = viz.add_subparsers(dest="viz_verb", metavar="WHAT")
    va = viz_sub.add_parser("attention", help="PNG grid of attention maps (layers x heads) for a text")
    va.add_argument("run_dir")
    va.add_argument("--text", required=True)
    va.add_argument("--out", default=None, help="PNG path (default RUN_DIR/plots/attention.png)")
    vc = viz_sub.add_parser("compare", help="several runs' curves on one PNG (loss, val metrics), with the last "
                            "and best value of each")
    vc.add_argument("runs", nargs="+", help="run folders (any kind: pretrain, finetune, distill)")
    vc.add_argument("--metric", default="loss,val_loss", help="comma-separated metrics.csv columns, one panel "
                    "each (e.g. val_loss, val_accuracy, val_bleu)")
    vc.add_argument("--x", default="step", help="step | tokens | elapsed (minutes)")
    vc.add_argument("--labels", default=None, help="comma-separated legend names (default: the folder names)")
    vc.add_argument("--out", default="compare.png", help="PNG path (default ./compare.png)")

    ds = sub.add_parser("distill", help="train a smaller student on a teacher run's data and next-token "
                        "distributions (the teacher's recipe; override the student's shape)", formatter_class=fmt,
                        epilog="example: kiln distill runs/demo-... --model.n_layer 2 --model.d_model 64\n"
                               "distill.* keys: alpha (weight of the KL term), temperature, checkpoint")
    ds.add_argument("teacher", help="the teacher's run folder")
    pr_ = sub.add_parser("prune", help="structured pruning of feed-forward neurons into a new, smaller run, with "
                         "the size / val loss / decoding speed trade-off", formatter_class=fmt,
                         epilog="recover accuracy with a short distillation: kiln distill RUN_DIR --init OUT")
    pr_.add_argument("run_dir")
    pr_.add_argument("--out", required=True, help="new run folder for the pruned model")
    pr_.add_argument("--ffn-keep", type=float, required=True, help="share of feed-forward neurons kept (0-1]")
    pr_.add_argument("--checkpoint", default="latest", help="latest, best, or a checkpoint folder")
    q = sub.add_parser("quantize", help="int8 weight-only quantization of a run into a new run folder, with the "
                       "size / val loss / decoding speed trade-off", formatter_class=fmt)
    q.add_argument("run_dir")
    q.add_argument("--out", required=True, help="new run folder for the quantized model")
    q.add_argument("--checkpoint", default="latest", help="latest, best, or a checkpoint folder")
    mg = sub.add_parser("merge", help="fold a LoRA run's adapters into its frozen base: a run folder with full "
                        "weights that loads, evaluates, exports and serves like any run", formatter_class=fmt)
    mg.add_argument("run_dir", help="a run trained with train.lora.rank > 0")
    mg.add_argument("--out", required=True, help="new run folder for the merged model")
    mg.add_argument("--checkpoint", default="best", help="best (the newest when the run has none), latest, or a "
                    "checkpoint folder")
    imp = sub.add_parser("import", help="import a checkpoint from another format")
    imp.add_argument("format", choices=["hf"])
    imp.add_argument("src")
    imp.add_argument("run_dir")
    exp = sub.add_parser("export", help="export a run to another format: hf (transformers folder) or onnx (a "
                         "classifier or language model for onnxruntime, checked and measured: OUT/report.json)")
    exp.add_argument("format", choices=["hf", "onnx", "peft"], help="peft: a LoRA run's adapters (adapter_config.json "
                     "+ adapter_model.safetensors) and its frozen base in OUT/base (transformers)")
    exp.add_argument("run_dir")
    exp.add_argument("out_dir")
    exp.add_argument("--int8", action="store_true", help="onnx: also model.int8.onnx (onnxruntime quantize_dynamic)")
    exp.add_argument("--checkpoint", default=None, help="best, latest or a checkpoint folder (default: latest; onnx: "
                     "best for a classifier)")

    ft = sub.add_parser("finetune", help="fine-tune a pretrained model on a task")
    ft_sub = ft.add_subparsers(dest="finetune_verb", metavar="TASK")
    from kiln import tasks

    # the task's module (and its config's help rows) only for the --help of the task named: `kiln --help` and a
    # mistake in a recipe stay light
    wants_help = bool({"-h", "--help"} & set(argv or []))
    for name, (_, summary) in tasks.REGISTRY.items():
        task = tasks.get(name) if (argv or [])[:2] == ["finetune", name] and wants_help else None
        sp = ft_sub.add_parser(name, help=summary, formatter_class=fmt, epilog=_task_epilog(task) if task else None,
                               description=task.usage if task else None)
        sp.add_argument("config", nargs="?", help=f"recipe YAML (e.g. {task.example})" if task else "recipe YAML")
        sp.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run exactly where its last "
                        "checkpoint left it (the run's own recipe; overrides still apply)")
    tr = sub.add_parser("translate", help="outputs of a seq2seq run for texts or a file")
    tr.add_argument("run_dir", help="a `kiln finetune seq2seq` run folder")
    tr.add_argument("--text", action="append", help="a source text (repeatable)")
    tr.add_argument("--file", help=".txt (one source per line) or .tsv/.csv/.jsonl with the run's source column "
                                   "(BLEU/chrF or ROUGE are printed when it has the target column too)")
    tr.add_argument("--out", help="write a TSV (source, reference, output) instead of printing")
    tr.add_argument("--num-beams", type=int, default=None, help="1 = greedy (default: the run's seq2seq.num_beams)")
    tr.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint folder")
    pr = sub.add_parser("predict", help="a fine-tuned run's predictions for a file: classes with probabilities "
                        "(classify, image), answers with spans (qa), entities (tokens)")
    pr.add_argument("run_dir", help="a `kiln finetune classify|qa|tokens|image` run folder, or RUN1,RUN2,... for an "
                    "ensemble of classifiers")
    pr.add_argument("file", help="inputs as the run was trained on them: a .csv/.tsv/.jsonl text table (classify), "
                    "SQuAD .json/.jsonl (qa), CoNLL/.jsonl (tokens), an image folder/IDX/CSV (image)")
    pr.add_argument("--out", help="output file (default RUN_DIR/predictions/<FILE stem>.<csv|jsonl>)")
    pr.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint folder")
    ev = sub.add_parser("eval", help="metrics of a run on a file: perplexity (pretraining runs), accuracy/F1 "
                        "(classifiers), BLEU/chrF or ROUGE (seq2seq); table + JSON",
                        description="Score a run on a file it did not train on. A pretraining run: loss, perplexity "
                        "and bits per byte on a text file (.txt, a folder of .txt, .jsonl/.csv with the run's text "
                        "column); masked-token accuracy for masked LM. A classifier run (or RUN1,RUN2,... for their "
                        "ensemble): accuracy, precision/recall/F1, confusion matrix, ROC/PR on a labelled "
                        ".csv/.tsv/.jsonl. A seq2seq run: BLEU/chrF (translate) or ROUGE (summarize) on a pair "
                        "file, outputs written beside the JSON.")
    ev.add_argument("run_dir", help="a run folder (pretrain, finetune classify or finetune seq2seq), or "
                    "RUN1,RUN2,... (classifiers) for their ensemble")
    ev.add_argument("file", help="the text, labelled or pair file to score")
    ev.add_argument("--out", help="output JSON (default RUN_DIR/eval/<FILE stem>.json; plots beside it)")
    ev.add_argument("--checkpoint", default="best", help="best (latest when the run has none), latest, or a "
                    "checkpoint folder")
    ev.add_argument("--stride", type=int, default=0, help="causal LM: tokens each window advances (default: the "
                    "context length, windows that do not overlap; smaller = more context per token, slower)")
    ev.add_argument("--batch-size", type=int, default=8, help="pretraining runs: windows per forward pass")
    ev.add_argument("--num-beams", type=int, default=None, help="seq2seq: beams (default: the run's)")
    ev.add_argument("--device", default="auto", help="pretraining runs: auto | cpu | cuda[:N]")
    return p


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull config overrides (--section.key VALUE, --section.key=VALUE, --seed 3) out of argv."""
    from dataclasses import fields

    from kiln.config import RunConfig

    top = {f.name for f in fields(RunConfig)} - {"out"}
    if argv[:2] == ["data", "prepare"]:
        top.discard("out")
    elif argv[:1] == ["finetune"]:
        from kiln import tasks

        top = {f.name for f in fields(tasks.config_class(argv[1]))} if argv[1:2] and argv[1] in tasks.REGISTRY \
            else set()
    elif argv[:1] in (["pretrain"], ["distill"]):
        top.add("out")
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and ("." in key or key in top):
            if "=" in arg or i + 1 >= len(argv):
                overrides.append(arg)
            else:
                overrides += [arg, argv[i + 1]]
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    extra: list[str] = []
    if argv[:1] in (["pretrain"], ["data"], ["finetune"], ["distill"]):
        argv, extra = split_overrides(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        unrecognized(parser, args, unknown)
    debug = args.debug or os.environ.get("KILN_DEBUG") == "1"
    if args.version:
        from kiln._version import __version__

        print(f"kiln {__version__}")
        return 0
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        return _dispatch(args, extra) or 0
    except KilnError as e:
        if debug:
            raise
        print(f"kiln: error: {e}", file=sys.stderr)
        torchrun_error_file(str(e))
        return 2
    except Exception as e:  # a full or read-only disk, a parent that is a file: one line naming the path
        from kiln.errors import filesystem_error

        verb = " ".join(filter(None, (args.verb, getattr(args, f"{args.verb}_verb", None))))  # data prepare, ...
        message = None if debug else filesystem_error(e, verb, after=resume_hint)
        if message is None:
            raise
        print(f"kiln: error: {message}", file=sys.stderr)
        torchrun_error_file(message)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


def _training(run, *args) -> int:
    """Run a training command; exit code 130 when it stopped on Ctrl-C/SIGTERM after saving a checkpoint."""
    from kiln.train.trainer import Interrupted

    try:
        run(*args)
    except Interrupted:
        return 130
    return 0


def _dispatch(args, extra: list[str]) -> int | None:
    require_run_folders(args)
    if args.verb == "pretrain":
        from pathlib import Path

        from kiln.config import load_config

        # the config first: a mistake in it is one line in ~0.3 s, before torch and the trainer are imported (~4 s)
        cfg = load_config(Path(args.resume) / "config.yaml" if args.resume is not None else args.config, extra)
        from kiln.train.scaling import env_world, scale_batch_and_lr

        scale_batch_and_lr(cfg, env_world()[1])  # an impossible global batch: every torchrun rank says so at once
        refuse_a_busy_resume(args.resume)
        from kiln.tasks.driver import train_from_cli
        from kiln.tasks.lm import TASK

        return _training(train_from_cli, TASK, cfg, args.resume)
    if args.verb == "data":
        if args.data_verb != "prepare":
            raise KilnError("usage: kiln data prepare [CONFIG.yaml] --out DIR [--data.KEY VALUE ...]")
        from pathlib import Path

        from kiln.config import load_config
        from kiln.data.prepare import prepare

        cfg = load_config(args.config, extra)
        prepare(cfg.data, Path(args.out), seed=cfg.seed)
        return 0
    if args.verb == "generate":
        from kiln.model.generation_settings import CLI_FLAGS, check_generation

        # one line before torch is imported (~3 s): the same check kiln.sample and kiln serve make
        check_generation(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_beams,
                         names=CLI_FLAGS)
        from kiln.api import sample

        print(sample(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                     args.seed, greedy=args.temperature == 0, which=args.checkpoint, stop=args.stop,
                     precision=args.precision, num_beams=args.num_beams, device=args.device))
        return 0
    if args.verb == "serve":
        from kiln.serve import serve

        serve(args.run_dir, args.host, args.port, args.max_batch, args.queue, args.checkpoint, args.device,
              args.precision)
        return 0
    if args.verb == "distill":
        from kiln.tasks.driver import train_from_cli
        from kiln.tasks.lm import TASK, distill_config

        return _training(train_from_cli, TASK, distill_config(args.teacher, extra))
    if args.verb == "prune":
        from kiln.compress.prune import prune_run

        prune_run(args.run_dir, args.out, args.ffn_keep, which=args.checkpoint)
        return 0
    if args.verb == "quantize":
        from kiln.compress.quantize import quantize_run

        quantize_run(args.run_dir, args.out, which=args.checkpoint)
        return 0
    if args.verb == "models":
        from kiln.model.config import PRESETS, preset
        from kiln.model.transformer import Transformer
        import torch

        print(f"{'preset':<18} {'arch':<16} {'layers':>6} {'d_model':>7} {'heads':>5} {'params':>10}")
        for name in PRESETS:
            cfg = preset(name).resolve()
            with torch.device("meta"):
                n = Transformer(cfg).num_parameters()
            print(f"{name:<18} {cfg.arch:<16} {cfg.n_layer:>6} {cfg.d_model:>7} {cfg.n_head:>5} {n / 1e6:>9.1f}M")
        return 0
    if args.verb == "viz":
        if args.viz_verb == "compare":
            from pathlib import Path

            from kiln.report.plots import compare_runs

            metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
            labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
            out, summary = compare_runs([Path(r) for r in args.runs], metrics, Path(args.out), args.x, labels)
            width = max(len(r["run"]) for r in summary) if summary else 3
            print(f"{'run':<{width}}  {'metric':<16} {'last':>10} {'best':>10}  at {args.x}")
            for r in summary:
                print(f"{r['run']:<{width}}  {r['metric']:<16} {r['last']:>10.4g} {r['best']:>10.4g}  {r['at']:g}")
            print(out)
            return 0
        if args.viz_verb != "attention":
            raise KilnError("usage: kiln viz attention RUN_DIR --text TEXT | kiln viz compare RUN1 RUN2 ...")
        from kiln.eval.attention import viz_attention

        print(viz_attention(args.run_dir, args.text, args.out))
        return 0
    if args.verb == "import":
        from kiln.interop.hf import import_hf

        import_hf(args.src, args.run_dir)
        print(f"imported {args.src} -> {args.run_dir}")
        return 0
    if args.verb == "merge":
        from kiln.compress.merge import merge_run

        merge_run(args.run_dir, args.out, which=args.checkpoint)
        return 0
    if args.verb == "export" and args.format == "peft":
        from kiln.interop.peft import export_peft

        export_peft(args.run_dir, args.out_dir, which=args.checkpoint or "best")
        print(f"exported the adapters of {args.run_dir} -> {args.out_dir} (its base model: {args.out_dir}/base)")
        return 0
    if args.verb == "export" and args.format == "onnx":
        from kiln.interop.onnx import export_onnx
        from kiln.tasks.classify import load_splits  # the classifier's own reading of its data (test accuracy)

        export_onnx(args.run_dir, args.out_dir, int8=args.int8, which=args.checkpoint, read_splits=load_splits)
        return 0
    if args.verb == "export":
        from kiln.interop.hf import export_hf

        export_hf(args.run_dir, args.out_dir, which=args.checkpoint or "latest")
        print(f"exported {args.run_dir} -> {args.out_dir}")
        return 0
    if args.verb == "translate":
        from kiln.tasks.seq2seq import translate_from_cli

        translate_from_cli(args.run_dir, args.text, args.file, args.num_beams, args.checkpoint, args.out)
        return 0
    if args.verb == "finetune":
        from kiln import tasks

        if args.finetune_verb not in tasks.REGISTRY:
            raise KilnError("usage: kiln finetune TASK [CONFIG.yaml] --data.train FILE [--section.key VALUE ...]; "
                            f"TASK is {' or '.join(tasks.REGISTRY)} (kiln finetune TASK --help)")
        if args.resume is None:  # the recipe and its overrides first: a mistake is one line before torch is imported
            from kiln.config import load_config
            from kiln.train.scaling import check_micro_batches, env_world

            cfg = load_config(args.config, extra, cls=tasks.config_class(args.finetune_verb))
            check_micro_batches(cfg.train, env_world()[1])  # every torchrun rank refuses at once
        refuse_a_busy_resume(args.resume)
        from kiln.config import load_config
        from kiln.tasks.driver import recipe_for, train_from_cli

        task = tasks.get(args.finetune_verb)
        cfg = load_config(recipe_for(task, args.config, args.resume), extra, cls=task.config_cls)
        return _training(train_from_cli, task, cfg, args.resume)
    if args.verb == "predict":
        from kiln.api import predict

        predict(args.run_dir, args.file, args.out, args.checkpoint)
        return 0
    if args.verb == "eval":
        from kiln.api import evaluate

        evaluate(args.run_dir, args.file, args.out, args.checkpoint, stride=args.stride, batch_size=args.batch_size,
                 num_beams=args.num_beams, device=args.device)
        return 0
    raise KilnError(f"unknown verb {args.verb!r}")


if __name__ == "__main__":
    sys.exit(main())
