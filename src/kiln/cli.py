"""The `kiln` command: parse, build a config, call one function per verb. Nothing else lives here.

Two tables: VERBS (kiln.cli_verbs: each verb's help and arguments, from which build_parser makes the parser) and
HANDLERS (each verb's handler: the checks that read before torch is imported, then its function in kiln.api).
Exit codes: 0 success, 2 the user's input is wrong (one line, no traceback; --debug shows it),
1 a bug in kiln, 130 interrupted after a clean save.
"""

from __future__ import annotations

import os
import sys

from kiln import api
from kiln.cli_checks import (RECIPE_VERBS, refuse_a_busy_resume, require_run_folders, resume_hint, split_overrides,
                             torchrun_error_file, unrecognized)
from kiln.cli_verbs import VERBS, build_parser  # noqa: F401 (build_parser: the docs' reference and tests)
from kiln.errors import KilnError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    extra: list[str] = []
    if argv[:1] and argv[0] in RECIPE_VERBS:
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
        require_run_folders(args)
        code = HANDLERS[args.verb](args, extra)  # an exit code, or None / what the API function gave: 0
        return code if type(code) is int else 0
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


# the handlers: (parsed args, config overrides) -> exit code (None or another result: 0). Each checks what it
# reads before torch and the verb's code are imported, then calls the verb's function in kiln.api


def _trained(run) -> int:
    """A training verb's exit code: 130 when it stopped on Ctrl-C/SIGTERM after saving a checkpoint."""
    from kiln.train.trainer import Interrupted

    try:
        run()
    except Interrupted:
        return 130
    return 0


def _pretrain(args, extra) -> int:
    from pathlib import Path

    from kiln.config import load_config

    # the config first: a mistake in it is one line in ~0.3 s, before torch and the trainer are imported (~4 s)
    cfg = load_config(Path(args.resume) / "config.yaml" if args.resume is not None else args.config, extra)
    from kiln.train.scaling import env_world, scale_batch_and_lr

    scale_batch_and_lr(cfg, env_world()[1])  # an impossible global batch: every torchrun rank says so at once
    refuse_a_busy_resume(args.resume)
    return _trained(lambda: api.pretrain(cfg, resume=args.resume))


def _finetune(args, extra) -> int:
    from kiln import tasks
    from kiln.config import load_config

    if args.finetune_verb not in tasks.REGISTRY:
        raise KilnError("usage: kiln finetune TASK [CONFIG.yaml] --data.train FILE [--section.key VALUE ...]; "
                        f"TASK is {' or '.join(tasks.REGISTRY)} (kiln finetune TASK --help)")
    cfg = None
    if args.resume is None:  # the recipe and its overrides first: a mistake is one line before torch is imported
        from kiln.train.scaling import check_micro_batches, env_world

        cfg = load_config(args.config, extra, cls=tasks.config_class(args.finetune_verb))
        check_micro_batches(cfg.train, env_world()[1])  # every torchrun rank refuses at once
    refuse_a_busy_resume(args.resume)
    # a resume loads the run's own recipe (refusing a second one), the overrides on top
    return _trained(lambda: api.finetune(args.finetune_verb, cfg if cfg is not None else args.config, extra,
                                         resume=args.resume))


def _distill(args, extra) -> int:
    return _trained(lambda: api.distill(args.teacher, extra))


def _data(args, extra) -> None:
    if args.data_verb != "prepare":
        raise KilnError("usage: kiln data prepare [CONFIG.yaml] --out DIR [--data.KEY VALUE ...]")
    api.prepare_data(args.config, extra, args.out)


def _generate(args, extra) -> None:
    from kiln.model.generation_settings import CLI_FLAGS, check_generation

    # one line before torch is imported (~3 s): the same check kiln.sample and kiln serve make
    check_generation(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_beams, names=CLI_FLAGS)
    print(api.sample(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                     args.seed, greedy=args.temperature == 0, which=args.checkpoint, stop=args.stop,
                     precision=args.precision, num_beams=args.num_beams, device=args.device))


def _chat(args, extra) -> None:
    from kiln.model.generation_settings import CLI_FLAGS, check_generation

    check_generation(args.max_new_tokens, args.temperature, args.top_k, args.top_p, names=CLI_FLAGS)  # before torch
    api.chat(args.run_dir, args.message, args.system, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
             args.seed, which=args.checkpoint, device=args.device, precision=args.precision)


def _models(args, extra) -> None:
    print(f"{'preset':<18} {'arch':<16} {'layers':>6} {'d_model':>7} {'heads':>5} {'params':>10}")
    for m in api.models():
        print(f"{m['preset']:<18} {m['arch']:<16} {m['n_layer']:>6} {m['d_model']:>7} {m['n_head']:>5} "
              f"{m['params'] / 1e6:>9.1f}M")


def _viz(args, extra) -> None:
    if args.viz_verb == "attention":
        print(api.attention(args.run_dir, args.text, args.out))
        return
    if args.viz_verb != "compare":
        raise KilnError("usage: kiln viz attention RUN_DIR --text TEXT | kiln viz compare RUN1 RUN2 ...")
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    out, summary = api.compare(args.runs, metrics, args.out, args.x, labels)
    width = max(len(r["run"]) for r in summary) if summary else 3
    print(f"{'run':<{width}}  {'metric':<16} {'last':>10} {'best':>10}  at {args.x}")
    for r in summary:
        print(f"{r['run']:<{width}}  {r['metric']:<16} {r['last']:>10.4g} {r['best']:>10.4g}  {r['at']:g}")
    print(out)


def _import(args, extra) -> None:
    api.import_run(args.src, args.run_dir, args.format)
    print(f"imported {args.src} -> {args.run_dir}")


def _export(args, extra) -> None:
    api.export(args.run_dir, args.out_dir, args.format, which=args.checkpoint, int8=args.int8, dtype=args.dtype)
    if args.format == "peft":
        print(f"exported the adapters of {args.run_dir} -> {args.out_dir} (its base model: {args.out_dir}/base)")
    elif args.format == "hf":
        print(f"exported {args.run_dir} -> {args.out_dir}")
    elif args.format == "gguf":
        from pathlib import Path

        print(f"exported {args.run_dir} -> {args.out_dir} ({args.dtype}); Ollama: ollama create NAME -f "
              f"{Path(args.out_dir).parent / 'Modelfile'}")


HANDLERS = {
    "pretrain": _pretrain, "finetune": _finetune, "distill": _distill, "data": _data, "generate": _generate,
    "models": _models, "viz": _viz, "import": _import, "export": _export, "chat": _chat,
    "serve": lambda a, _: api.serve(a.run_dir, a.host, a.port, a.max_batch, a.queue, a.checkpoint, a.device,
                                    a.precision),
    "prune": lambda a, _: api.prune(a.run_dir, a.out, a.ffn_keep, which=a.checkpoint),
    "quantize": lambda a, _: api.quantize(a.run_dir, a.out, which=a.checkpoint),
    "merge": lambda a, _: api.merge(a.run_dir, a.out, which=a.checkpoint),
    "translate": lambda a, _: api.translate(a.run_dir, a.text, a.file, a.num_beams, a.checkpoint, a.out),
    "predict": lambda a, _: api.predict(a.run_dir, a.file, a.out, a.checkpoint),
    "eval": lambda a, _: api.evaluate(a.run_dir, a.file, a.out, a.checkpoint, stride=a.stride,
                                      batch_size=a.batch_size, num_beams=a.num_beams, device=a.device,
                                      benchmark=a.benchmark, chat=a.chat, max_new_tokens=a.max_new_tokens),
}
assert set(HANDLERS) == set(VERBS), "every verb has a parser row and a handler"

if __name__ == "__main__":
    sys.exit(main())
