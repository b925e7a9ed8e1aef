"""kiln decoder runs -> GGUF files for llama.cpp and the tools built on it (Ollama, LM Studio, ...).

    export_gguf("runs/smollm2", "out/smollm2.gguf", dtype="q8_0")   # + out/Modelfile for `ollama create`

A rope decoder is written as llama.cpp's `llama` architecture (`qwen2` when only q/k/v carry biases), a learned
-position decoder as `gpt2`. The weights go through the family's Hugging Face names (kiln.interop.llama /
gpt2) and gguf's own name table, so the names are llama.cpp's; `llama` q/k rows are permuted to llama.cpp's
pair-wise RoPE order (kiln.interop.gguf_read.permute), GPT-2's Conv1D weights are stored [out, in] as
llama.cpp's converter stores them. Norms and biases stay F32 (as llama.cpp's converter keeps 1-D tensors);
matrices are F32, F16, BF16 or Q8_0 (quantized by the gguf package). The tokenizer, its special tokens and
the chat template kiln chats with go into the metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.model.config import ModelConfig

DTYPES = ("f32", "f16", "bf16", "q8_0")
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name for a kiln decoder config, or a KilnError saying why it has none."""
    from kiln.interop.hf import family_for

    if cfg.arch != "decoder" or cfg.channels:
        raise KilnError(f"GGUF export is for decoder language models; this run's model.arch is {cfg.arch}")
    family = family_for(cfg)
    family.config_to_hf(cfg)  # the family's own checks (norms, biases, activation) name what does not fit
    if family.FAMILY == "gpt2":
        if cfg.activation not in ("gelu_tanh", "gelu"):
            raise KilnError(f"cannot export to GGUF gpt2: llama.cpp's GPT-2 uses GELU, this run model.activation "
                            f"{cfg.activation}")
        return "gpt2"
    return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """kiln state dict -> {GGUF tensor name: fp32 tensor in llama.cpp's row layout}."""
    import gguf

    from kiln.interop import gpt2, llama
    from kiln.interop.gguf_read import permute

    family = gpt2 if arch == "gpt2" else llama
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2 if arch == "gpt2" else gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    out = {}
    for hf_name, t in family.state_to_hf(state, cfg).items():
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base)
        assert name is not None, f"gguf has no name for {hf_name}"
        t = t.detach().float()
        if arch == "gpt2" and hf_name.endswith(_CONV1D):
            t = t.t()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            t = permute(t, cfg.n_head if base.endswith("q_proj") else cfg.n_kv_head)
        out[f"{name}.{suffix}"] = t.contiguous()
    if cfg.rope_scaling == "llama3":  # llama.cpp's form of it (transformers' GGUF loader does not read it)
        from kiln.interop.gguf_rope import rope_freqs

        out["rope_freqs.weight"] = rope_freqs(cfg)
    return out


def encode(t: torch.Tensor, dtype: str):
    """(array, raw GGML type or None) of one tensor in `dtype`; 1-D tensors and rows that Q8_0's 32-value
    blocks do not divide stay as llama.cpp's converter leaves them (F32; F16)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    a = t.numpy()
    if a.ndim == 1 or dtype == "f32":
        return a.astype(np.float32), None
    if dtype == "f16" or (dtype == "q8_0" and a.shape[-1] % 32):
        return a.astype(np.float16), None
    qtype = Q.BF16 if dtype == "bf16" else Q.Q8_0
    return quantize(a, qtype), qtype


def _specials(root: Path, tokenizer) -> dict:
    f = root / "tokenizer_config.json"
    if f.is_file():
        return json.loads(f.read_text(encoding="utf-8"))
    eot = "<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None else None
    return {"bos_token": eot, "eos_token": eot} if eot else {}


def _metadata(w, cfg: ModelConfig, arch: str, dtype: str, name: str) -> None:
    import gguf

    ft = gguf.LlamaFileType
    w.add_name(name)
    w.add_file_type({"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[dtype])
    if dtype in ("q8_0", "bf16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling_factor)
    w.add_vocab_size(cfg.vocab_size)


def _tokenizer(w, fields: dict, template: str) -> None:
    w.add_tokenizer_model(fields["tokenizer.ggml.model"])
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in fields:  # byte-level BPE
        w.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
        w.add_token_merges(fields["tokenizer.ggml.merges"])
    else:  # SentencePiece: its merges are the scores' order
        w.add_token_scores(fields["tokenizer.ggml.scores"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unknown_token_id", w.add_unk_token_id), ("padding_token_id", w.add_pad_token_id)):
        if f"tokenizer.ggml.{key}" in fields:
            add(fields[f"tokenizer.ggml.{key}"])
    w.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"])
    w.add_chat_template(template)


def modelfile(gguf_name: str, template, context_length: int) -> str:
    """An Ollama Modelfile: the GGUF (its chat template is in the metadata, which Ollama reads), the stops."""
    lines = [f"FROM ./{gguf_name}", f"PARAMETER num_ctx {context_length}"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in template.end_of_turn()]
    if template.is_default:  # ChatML, written in Ollama's Go template language
        lines.append('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{ end }}<|im_start|>assistant\n"""')
    return "\n".join(lines) + "\n"


def export_gguf(run_dir: str | Path, out: str | Path, dtype: str = "f32", which: str = "latest") -> Path:
    """`kiln export gguf RUN OUT.gguf [--dtype f32|f16|bf16|q8_0]`: the GGUF file and a Modelfile beside it.
    Everything is checked and converted before the file is written (to a temporary name, then renamed)."""
    import gguf

    from kiln.data.chat import ChatTemplate
    from kiln.interop.gguf_tokenizer import gguf_tokenizer_fields
    from kiln.run.checkpoint import atomic_write_text, find_checkpoint
    from kiln.run.load import load

    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise KilnError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    model, tokenizer, run = load(run_dir, which, quantized_ok=False)
    cfg = run.model.with_().resolve()
    arch = architecture(cfg)
    if tokenizer is None:
        raise KilnError(f"{run_dir}: no tokenizer.json; a GGUF file carries its tokenizer")
    root = find_checkpoint(run_dir, which).parent.parent
    template = ChatTemplate.of_run(root)
    fields = gguf_tokenizer_fields(tokenizer.to_str(), cfg.vocab_size, _specials(root, tokenizer))
    tensors = {name: encode(t, dtype) for name, t in gguf_tensors(model.state_dict(), cfg, arch).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        _metadata(w, cfg, arch, dtype, run.name or root.name)
        _tokenizer(w, fields, template.source)
        for name, (array, raw) in tensors.items():
            w.add_tensor(name, array, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(out.parent / "Modelfile", modelfile(out.name, template, cfg.context_length))
    if arch == "gpt2" and cfg.activation == "gelu":
        import sys

        print("kiln: warning: llama.cpp's GPT-2 computes GELU with its tanh approximation and this run uses exact "
              "GELU (model.activation gelu): its logits there differ slightly (about 1e-3)", file=sys.stderr)
    return out
