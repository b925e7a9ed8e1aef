"""The machinery under the per-family name maps: expand, check, fuse/split, transpose.

A family file lists its layout as `Entry`s: one kiln tensor and the HF tensor(s) it comes from. Several HF
tensors are concatenated along dim 0 into one kiln tensor (q/k/v -> qkv_proj, gate/up -> up_proj); GPT-2's
Conv1D weights are stored [in, out] and are transposed. Everything else is a rename.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.model.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    kiln: str                       # kiln tensor name
    hf: tuple[str, ...]             # HF tensor name(s), concatenated along dim 0 in this order
    split: tuple[int, ...] = ()     # dim-0 sizes of the HF parts (fused entries only)
    transpose: bool = False         # HF stores it [in, out] (GPT-2 Conv1D)


def entries(layout: list[tuple], n_layer: int) -> list[Entry]:
    """Expand `{}` (layer index) in a layout of (kiln, hf | tuple of hf[, split][, transpose]) rows."""
    out = []
    for row in layout:
        kiln, hf, *rest = row
        hf = (hf,) if isinstance(hf, str) else tuple(hf)
        split = next((r for r in rest if isinstance(r, tuple)), ())
        transpose = any(r is True for r in rest)
        layers = range(n_layer) if "{}" in kiln else [None]
        for i in layers:
            out.append(Entry(kiln.replace("{}", str(i)), tuple(h.replace("{}", str(i)) for h in hf), split, transpose))
    return out


def kiln_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of the kiln model `cfg` describes (built on the meta device: no memory)."""
    from kiln.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.with_())
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _hf_shapes(entry: Entry, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    parts = [(n,) + shape[1:] for n in entry.split] if entry.split else [shape]
    return [tuple(reversed(p)) if entry.transpose else p for p in parts]


def from_hf(hf_state: dict[str, torch.Tensor], layout: list[Entry], cfg: ModelConfig, family: str,
            ignore: tuple[str, ...] = (), prefix: str = "") -> dict[str, torch.Tensor]:
    """HF state dict -> kiln state dict. Missing, misshapen or unknown HF tensors are KilnErrors naming them.

    Layouts name tensors as the *For...LM classes save them (`transformer.`, `model.`, `bert.` + the head);
    a base-model checkpoint (GPT2Model, LlamaModel, BertModel) saves them without that `prefix`.
    """
    shapes = kiln_shapes(cfg)
    strip = bool(prefix) and not any(k.startswith(prefix) for k in hf_state)
    state, used = {}, set()
    for e in layout:
        assert e.kiln in shapes, f"{family} layout names {e.kiln}, which the kiln model does not have"
        parts = []
        for name, want in zip(e.hf, _hf_shapes(e, shapes[e.kiln])):
            name = name.removeprefix(prefix) if strip else name
            if name not in hf_state:
                raise KilnError(f"{family} checkpoint: missing weight {name!r}")
            t = hf_state[name]
            if tuple(t.shape) != want:
                raise KilnError(f"{family} checkpoint: weight {name!r} has shape {tuple(t.shape)}, "
                                f"config.json implies {want}")
            parts.append(t.t() if e.transpose else t)
            used.add(name)
        state[e.kiln] = (torch.cat(parts, 0) if len(parts) > 1 else parts[0]).contiguous()
    for name in hf_state:
        if name not in used and not any(re.search(p, name) for p in ignore):
            raise KilnError(f"{family} checkpoint: unexpected weight {name!r} (not in the {family} layout "
                            f"kiln maps for this config.json)")
    return state


def to_hf(kiln_state: dict[str, torch.Tensor], layout: list[Entry], family: str) -> dict[str, torch.Tensor]:
    """kiln state dict -> HF state dict (fresh contiguous tensors: safetensors refuses shared memory)."""
    out = {}
    for e in layout:
        if e.kiln not in kiln_state:
            raise KilnError(f"kiln checkpoint: missing tensor {e.kiln!r} needed for the {family} export")
        t = kiln_state[e.kiln].detach().cpu()
        parts = t.split(list(e.split), 0) if e.split else [t]
        for name, p in zip(e.hf, parts):
            out[name] = (p.t() if e.transpose else p).contiguous().clone()
    return out


def need(h: dict, key: str, family: str):
    if h.get(key) is None:
        raise KilnError(f"{family} config.json: missing key {key!r}")
    return h[key]


def token_ids(h: dict) -> dict:
    """pad/bos/eos ids carried over verbatim (HF allows an int, a list or null)."""
    return {k: h[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id") if h.get(k) is not None}


def pad_id(h: dict) -> int:
    p = h.get("pad_token_id")
    return p if isinstance(p, int) else -1


def require(cfg: ModelConfig, family: str, **expected) -> None:
    """config_to_hf guard: every listed ModelConfig field must have the value the HF family hard-codes."""
    for key, want in expected.items():
        have = getattr(cfg, key)
        ok = have in want if isinstance(want, (tuple, list, set)) else have == want
        if not ok:
            raise KilnError(f"cannot export to {family}: model.{key} is {have!r}, {family} needs "
                            + (" or ".join(map(repr, want)) if isinstance(want, (tuple, list, set)) else repr(want)))
