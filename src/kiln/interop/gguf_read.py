"""GGUF files (llama.cpp, Ollama) -> kiln run folders.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/smollm2")

A llama-family file (`general.architecture` llama or qwen2) becomes a kiln decoder run: its tensors dequantized
to fp32 by the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants), renamed to the Hugging Face
Llama names and mapped through kiln.interop.llama; tokenizer.json rebuilt from the metadata
(kiln.interop.gguf_tokenizer), the special tokens in tokenizer_config.json and the chat template in
chat_template.jinja, as a transformers folder keeps them.

llama.cpp's `llama` graph applies RoPE to adjacent pairs of a head's dimensions, so its converter permutes
the q/k rows of each head from Hugging Face's "rotate half" order; `unpermute` restores them. Its `qwen2`
graph rotates halves, and the rows are stored as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.model.config import ModelConfig

ARCHS = ("llama", "qwen2")
PERMUTED = ("llama",)  # the architectures whose q/k rows llama.cpp's converter permutes
_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` over the file, or a one-line KilnError: not a GGUF file, truncated, unreadable."""
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise KilnError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise KilnError("reading GGUF files needs the gguf package: pip install 'kiln[gguf]'") from None
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the header or the tensor table runs past the end, a bad type code, ...
        raise KilnError(f"{path}: cannot read GGUF ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "the file is truncated or damaged") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise KilnError(f"{path}: truncated GGUF file ({size} bytes; tensor {t.name!r} ends at byte "
                            f"{t.data_offset + t.n_bytes})")
    return reader


def metadata(reader) -> dict:
    """Every key-value field of the header as Python values (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field of a type this gguf version cannot decode: kiln does not read it
            continue
    return out


def _need(meta: dict, key: str, where: str):
    if meta.get(key) is None:
        raise KilnError(f"{where}: missing metadata key {key!r}")
    return meta[key]


def config_from_gguf(meta: dict, names: set[str], where: str, rope_freqs: torch.Tensor | None = None) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise KilnError(f"{where}: unsupported GGUF architecture {arch!r}; kiln imports {', '.join(ARCHS)}")
    get = lambda key: _need(meta, f"{arch}.{key}", where)  # noqa: E731
    d, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = meta.get(f"{arch}.attention.head_count_kv") or n_head
    head_dim = d // n_head
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"{arch}.{key}", head_dim) != head_dim:
            raise KilnError(f"{where}: {arch}.{key} {meta[f'{arch}.{key}']} != embedding_length/head_count "
                            f"({head_dim}) is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise KilnError(f"{where}: rope scaling {scaling!r} in a GGUF file is not supported (kiln reads plain RoPE, "
                        "linear scaling and Llama 3's rope_freqs)")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    vocab = meta.get(f"{arch}.vocab_size") or len(_need(meta, "tokenizer.ggml.tokens", where))
    pad = meta.get("tokenizer.ggml.padding_token_id")
    cfg = ModelConfig(
        arch="decoder", vocab_size=int(vocab), n_layer=int(get("block_count")), n_head=n_head, n_kv_head=int(n_kv),
        d_model=d, d_ff=int(get("feed_forward_length")), context_length=int(get("context_length")),
        position="rope", rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)), norm="rmsnorm",
        rope_scaling=scaling, rope_scaling_factor=factor,
        norm_eps=float(get("attention.layer_norm_rms_epsilon")), pre_norm=True, final_norm=True,
        activation="swiglu", bias=False, qkv_bias=arch == "qwen2", dropout=0.0,
        tie_embeddings="output.weight" not in names, type_vocab_size=0,
        pad_token_id=int(pad) if isinstance(pad, int) else -1)
    if rope_freqs is None:
        return cfg
    from kiln.interop.gguf_rope import llama3_keys

    keys = llama3_keys(rope_freqs, cfg.with_().resolve()) if rope_freqs.numel() == head_dim // 2 else None
    if keys is None:
        raise KilnError(f"{where}: its rope_freqs are not Llama 3's RoPE scaling; kiln cannot read them")
    return cfg.with_(**keys)


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotate-half rows of each head -> llama.cpp's interleaved pairs (its converter's order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_name(name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor name, or None for one kiln does not map."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    return None


def hf_state(reader, cfg: ModelConfig, arch: str, where: str) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its Hugging Face name, q/k rows in Hugging Face's order."""
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # Llama 3's RoPE scaling: read into the config (kiln.interop.gguf_rope)
            continue
        name = hf_name(t.name)
        if name is None:
            raise KilnError(f"{where}: unexpected tensor {t.name!r} for a {arch} model")
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise KilnError(f"{where}: tensor {t.name!r} is of type {t.tensor_type.name}, which the gguf package "
                            "cannot dequantize") from None
        w = torch.from_numpy(array.reshape([int(n) for n in reversed(t.shape)]).copy()).float()
        if arch in PERMUTED and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            w = unpermute(w, cfg.n_head if ".q_proj." in name else cfg.n_kv_head)
        state[name] = w
    return state


def read_gguf(path: str | Path):
    """(ModelConfig, kiln state dict, tokenizers.Tokenizer, tokenizer_config dict, chat template or None)."""
    from kiln.interop import llama
    from kiln.interop.gguf_tokenizer import special_tokens, tokenizer_from_gguf

    reader = open_gguf(path)
    where = str(path)
    meta = metadata(reader)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is not None:  # the rows of the embedding, which may outnumber the tokenizer's tokens
        meta.setdefault(f"{meta.get('general.architecture')}.vocab_size", int(embed.shape[-1]))
    freqs = next((torch.from_numpy(t.data.astype("float32").reshape(-1)) for t in reader.tensors
                  if t.name == "rope_freqs.weight"), None)
    cfg = config_from_gguf(meta, {t.name for t in reader.tensors}, where, freqs)
    try:
        cfg.validate()
    except KilnError as e:
        raise KilnError(f"{where}: {e}") from None
    tokenizer = tokenizer_from_gguf(meta, where)
    try:
        state = llama.state_from_hf(hf_state(reader, cfg, meta["general.architecture"], where), cfg)
    except KilnError as e:
        raise KilnError(f"{where}: {e}") from None
    template = meta.get("tokenizer.chat_template")
    return cfg, state, tokenizer, special_tokens(meta), template if isinstance(template, str) else None


def import_gguf(src: str | Path, run_dir: str | Path, overwrite: bool = False) -> Path:
    """`kiln import gguf FILE RUN_DIR`: a kiln run folder (config.yaml, tokenizer.json, tokenizer_config.json,
    chat_template.jinja, checkpoints/step_000000) from a GGUF file. Everything is read and checked before the
    folder is created."""
    from kiln.interop.run_files import write_imported_run

    src, run_dir = Path(src), Path(run_dir)
    if (run_dir / "config.yaml").exists() and not overwrite:
        raise KilnError(f"{run_dir} already holds a kiln run; pick another folder or pass overwrite=True")
    cfg, state, tokenizer, specials, template = read_gguf(src)
    return write_imported_run(run_dir, cfg, state, name=src.stem, source=src, tokenizer_json=tokenizer.to_str(),
                              tokenizer_config=specials, chat_template=template, model_type="gguf")
