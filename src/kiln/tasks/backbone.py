"""The backbone a fine-tuning task starts from: a kiln run folder, or a Hugging Face folder imported once into the
run folder (run_dir/base), with its tokenizer."""

from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def resolve_init(init: str, checkpoint: str, run_dir: Path, log) -> tuple[Path, str, dict]:
    """(the kiln run folder to start from, its checkpoint, info for data.json) of `init`: a Hugging Face folder is
    imported once into run_dir/base (a resumed run finds it there), a kiln run is used where it is."""
    path, info = Path(init).expanduser(), {"init": init}
    if not is_hf_folder(path):
        return path, checkpoint, {**info, "kind": "kiln", "checkpoint": checkpoint}
    from kiln.interop.hf import import_hf

    base = run_dir / "base"
    if (base / "config.yaml").is_file() or (base / "run.json").is_file():
        log(f"using the backbone already imported into {base}")
    else:
        log(f"importing Hugging Face model {path} -> {base}")
        import_hf(path, base)
    return base, "latest", {**info, "kind": "huggingface", "imported_to": str(base)}


def load_backbone(init: str, checkpoint: str, run_dir: Path, log, refuse: tuple[str, ...] = ()):
    """(backbone, tokenizer, info) from `init`: a kiln run folder, or a Hugging Face folder imported into
    run_dir/base. `refuse`: config files of run kinds that are no backbone (a fine-tuned classifier)."""
    from kiln.run.load import load

    if not init:
        raise KilnError("init is empty: name a kiln run folder or a Hugging Face model folder (--init PATH)")
    path = Path(init).expanduser()
    if not path.exists():
        raise KilnError(f"init not found: {path}")
    for name in refuse:
        if (path / name).is_file():
            raise KilnError(f"init {path} is a fine-tuned run ({name}); start from its backbone (a kiln run or HF "
                            "folder)")
    path, which, info = resolve_init(str(path), checkpoint, run_dir, log)
    backbone, tokenizer, run_cfg = load(path, which, quantized_ok=False)
    if tokenizer is None:
        raise KilnError(f"init {path} has no tokenizer.json; fine-tuning needs the backbone's tokenizer")
    return backbone, tokenizer, info


def adopt_backbone(cfg, run_dir: Path, log, refuse: tuple[str, ...] = ()):
    """(backbone, tokenizer, info) of cfg.init, its shape as the run's model config (cfg.model, saved with the
    run so it loads without init) and data.max_length capped at its context length."""
    import copy

    backbone, tokenizer, info = load_backbone(cfg.init, cfg.init_checkpoint, run_dir, log, refuse=refuse)
    cfg.model = copy.deepcopy(backbone.config)
    if cfg.data.max_length > cfg.model.context_length:
        log(f"note: data.max_length {cfg.data.max_length} > the backbone's context_length "
            f"{cfg.model.context_length}: using {cfg.model.context_length}")
        cfg.data.max_length = cfg.model.context_length
    return backbone, tokenizer, info
