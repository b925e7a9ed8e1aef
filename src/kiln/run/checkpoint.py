"""Checkpoints: atomic, pickle-free weights, and a run folder layout every verb understands.

run_dir/
  config.yaml                 resolved config (reproduce the run from the folder alone)
  tokenizer.json
  checkpoints/step_000500/    model.safetensors, trainer.pt (optimizer, step, RNG), meta.json
  checkpoints/latest          text file naming the newest complete checkpoint
  checkpoints/best            text file naming the one with the lowest val loss
  lora/base.safetensors       a LoRA run (train.lora.rank > 0): the frozen base, written once; its checkpoints
                              hold only what trains (adapters, the task head) and name this file and its sha256

A checkpoint is written into a hidden temp folder, every file fsynced, then renamed into place: a crash or
SIGKILL at any instant leaves either the old set of checkpoints or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kiln._version import __version__
from kiln.errors import KilnError

CHECKPOINTS = "checkpoints"
LORA_BASE = "lora/base.safetensors"  # a LoRA run's frozen base, relative to the run folder


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DDP wrappers (no `_orig_mod.` / `module.` prefixes in files)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without duplicated tied tensors (safetensors refuses shared memory)."""
    model = unwrap(model)
    state, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue  # e.g. lm_head.weight tied to the token embedding
        if key is not None:
            seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state


def save_weights(model: torch.nn.Module, path: Path, metadata: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """`state`: already gathered full weights (a sharded model); default model_state(model)."""
    save_file(model_state(model) if state is None else state, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def weights_prefix(run_cfg) -> str:
    """Where a run's model sits in its checkpoints: an ELECTRA run stores its encoder under `discriminator.`,
    beside the generator it was trained with."""
    return "discriminator." if getattr(run_cfg, "objective", "") == "electra" else ""


def load_weights(model: torch.nn.Module, path: Path, prefix: str = "") -> None:
    """Load a safetensors file into `model`, strictly (names and shapes). `prefix`: take only the tensors
    under it (e.g. an ELECTRA run's `discriminator.`), without the prefix."""
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            info = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise KilnError(f"{path}: cannot read weights ({str(e).splitlines()[0]})") from None
    if "lora" in info:  # adapters + head only: the frozen base beside, merged unless the model has adapters
        state = _with_lora_base(Path(path), state, info, model)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model = unwrap(model)
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise KilnError(f"{path}: unexpected tensor {name!r} (not in the model built from config.yaml)")
        if expected[name].shape != tensor.shape:
            raise KilnError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"the config expects {tuple(expected[name].shape)}")
    missing, _ = model.load_state_dict(state, strict=False)
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [m for m in missing if m not in tied]
    if missing:
        raise KilnError(f"{path}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, step: int, trainer_state: dict | None = None,
                    meta: dict | None = None, keep_last: int = 2, is_best: bool = False,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoints/step_<N>/ atomically, move the `latest` (and `best`) pointers, prune old ones."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
            "kiln": __version__, **(meta or {})}
    info = {"step": step}
    from kiln.model.lora import spec_of

    if spec_of(unwrap(model)) is not None:  # LoRA: only what trains; the frozen base once, beside
        weights, lora_info = _lora_weights(Path(run_dir), model, weights)
        info.update(lora_info)
        meta.update(lora=json.loads(lora_info["lora"]), lora_base=LORA_BASE)
    save_weights(model, tmp / "model.safetensors", info, state=weights)
    files = [tmp / "model.safetensors"]
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer.pt")
        files.append(tmp / "trainer.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    files.append(tmp / "meta.json")
    for f in files:
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. interrupt right after a periodic save)
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")
    if is_best:
        atomic_write_text(root / "best", name + "\n")
    _prune(root, keep_last)
    return final


_DIGESTS: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    import hashlib

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _lora_weights(run_dir: Path, model: torch.nn.Module, state: dict | None) -> tuple[dict, dict]:
    """A LoRA model's checkpoint tensors (those that train) and metadata; the base (the model as training began,
    adapters aside) is written once to run_dir/lora/base.safetensors: a resume finds it, every checkpoint names
    its sha256."""
    from kiln.model.lora import base_state, spec_of, trainable_names

    plain = unwrap(model)
    state = model_state(model) if state is None else state
    train = trainable_names(plain)
    base = run_dir / LORA_BASE
    if not base.is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        tmp = base.with_name(f".{base.name}.tmp-{os.getpid()}")
        save_file(base_state(plain, state), str(tmp), metadata={"kind": "lora-base"})
        _fsync_file(tmp)
        os.replace(tmp, base)
        _fsync_dir(base.parent)
    info = {"lora": spec_of(plain).to_json(), "lora_base": LORA_BASE, "lora_base_sha256": _sha256(base)}
    return {k: v for k, v in state.items() if k in train}, info


def _lora_base(path: Path, info: dict) -> dict[str, torch.Tensor]:
    """The frozen base a LoRA checkpoint (path: run/checkpoints/step_N/model.safetensors) names, checked."""
    base_file = path.parent.parent.parent / info.get("lora_base", LORA_BASE)
    if not base_file.is_file():
        raise KilnError(f"{path}: a LoRA checkpoint whose frozen base {base_file} is missing (it lives in the run "
                        "folder beside checkpoints/)")
    if info.get("lora_base_sha256") and _sha256(base_file) != info["lora_base_sha256"]:
        raise KilnError(f"{path}: the frozen base {base_file} is not the one this checkpoint was trained on "
                        "(sha256 differs)")
    try:
        return load_file(str(base_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise KilnError(f"{base_file}: cannot read weights ({str(e).splitlines()[0]})") from None


def _with_lora_base(path: Path, state: dict, info: dict, model: torch.nn.Module) -> dict:
    """The full state of a LoRA checkpoint: its frozen base + its tensors; for a model without adapters (eval,
    predict, export, merge) the adapters folded into the weights (kiln.model.lora.merge_state)."""
    from kiln.model.lora import LoraSpec, merge_state, spec_of

    full = {**_lora_base(path, info), **state}
    return full if spec_of(unwrap(model)) is not None else merge_state(full, LoraSpec.from_json(info["lora"]))


def read_lora_checkpoint(ckpt_dir: Path):
    """(kiln.model.lora.LoraSpec, frozen base state, trained state) of a LoRA checkpoint folder."""
    from kiln.model.lora import LoraSpec

    path = Path(ckpt_dir) / "model.safetensors"
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            info = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise KilnError(f"{path}: cannot read weights ({str(e).splitlines()[0]})") from None
    if "lora" not in info:
        raise KilnError(f"{ckpt_dir} holds full weights, not LoRA adapters (train.lora.rank was 0)")
    return LoraSpec.from_json(info["lora"]), _lora_base(path, info), state


def checkpoint_lora(ckpt_dir: Path):
    """The kiln.model.lora.LoraSpec of a checkpoint folder's weights, or None (full weights)."""
    try:
        with safe_open(str(Path(ckpt_dir) / "model.safetensors"), "pt") as f:
            text = (f.metadata() or {}).get("lora")
    except (SafetensorError, OSError, ValueError):
        return None
    if text is None:
        return None
    from kiln.model.lora import LoraSpec

    return LoraSpec.from_json(text)


def _prune(root: Path, keep_last: int) -> None:
    keep = {_read_pointer(root, "latest"), _read_pointer(root, "best")}
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in steps[:-keep_last] if keep_last > 0 else []:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):  # leftovers of a crashed save
        shutil.rmtree(p, ignore_errors=True)


def _read_pointer(root: Path, pointer: str) -> str | None:
    f = root / pointer
    return f.read_text().strip() if f.is_file() else None


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """Resolve a run folder (or a checkpoint folder) to one complete checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise KilnError(f"checkpoint not found: {path} does not exist")
    if (path / "model.safetensors").is_file():
        return path
    if which not in ("latest", "best"):  # a checkpoint folder, or a step_* name inside this run
        chosen = Path(which) if Path(which).is_dir() else path / CHECKPOINTS / which
        if not (chosen / "model.safetensors").is_file():
            raise KilnError(f"checkpoint not found: {chosen} (expected latest, best, or a folder with model.safetensors)")
        return chosen
    root = path / CHECKPOINTS
    name = _read_pointer(root, which) if root.is_dir() else None
    if name is None and root.is_dir():  # pointer lost: fall back to the newest complete folder
        complete = sorted(p for p in root.glob("step_*") if (p / "model.safetensors").is_file())
        name = complete[-1].name if complete else None
    if name is None or not (root / name / "model.safetensors").is_file():
        raise KilnError(f"no checkpoint in {path} (expected {root}/{which} naming a step_* folder with model.safetensors)")
    return root / name


def load_trainer_state(ckpt_dir: Path) -> dict:
    f = ckpt_dir / "trainer.pt"
    if not f.is_file():
        raise KilnError(f"{ckpt_dir}: no trainer.pt; this checkpoint holds weights only and cannot be resumed")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupted or truncated file; weights_only never unpickles code
        raise KilnError(f"{f}: corrupted trainer state ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def read_meta(ckpt_dir: Path) -> dict:
    try:
        return json.loads((ckpt_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
