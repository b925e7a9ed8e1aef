"""LoRA's config (kiln.model.lora): beside its code, importing nothing but kiln.config_loader."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config_loader import _f


@dataclass
class LoraConfig:
    rank: int = _f(0, "LoRA: rank of the low-rank adapters on the frozen model's linear layers; only the adapters "
                   "and the task's head train (checkpoints hold those, the frozen base is stored once in the run "
                   "folder); 0 = off (all weights train)", range=">= 0")
    alpha: float = _f(16.0, "LoRA scale: the adapters' output is multiplied by alpha / rank", range="> 0")
    dropout: float = _f(0.05, "dropout on the adapters' input", range="[0, 1)")
    targets: str = _f("qkv_proj,out_proj", "comma-separated linear layers that get adapters: a module name's last "
                      "parts (qkv_proj, out_proj, mlp.up_proj, mlp.down_proj, q_proj, kv_proj) or a glob over the "
                      "full name (decoder.blocks.[0-3].attn.*); default the self-attention projections")
    int8_base: bool = _f(False, "QLoRA-style: the frozen linear layers as int8 weights (per-channel, kiln.model.int8); "
                         "the adapters and the head stay fp32")
    modules_to_save: str = _f("", "comma-separated modules trained in full besides the adapters (PEFT's "
                              "modules_to_save; a task's head always is), e.g. decoder.norm")
