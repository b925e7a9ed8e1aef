"""A GGUF file's tokenizer metadata <-> tokenizer.json (the `tokenizers` library's format).

GGUF keeps a GPT-2-style byte-level BPE as lists (`tokenizer.ggml.tokens`, `.merges`, `.token_type`) plus the
name of the pre-tokenizer its merges were learned with (`tokenizer.ggml.pre`). kiln rebuilds the tokenizer.json
that splits text the same way: the byte-level alphabet, the split regex that `pre` names, control tokens as
special added tokens (kept whole, skipped when decoding) and user-defined ones as plain added tokens.
"""

from __future__ import annotations

import json

from kiln.errors import KilnError

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6  # llama.cpp's token types

# the split regexes of the `tokenizer.ggml.pre` names llama.cpp writes (from the models' own tokenizer.json)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3,
          "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}
DIGITS_FIRST = ("smollm", "starcoder")  # HF: Digits(individual) then GPT-2's byte-level regex
SPECIAL_ROLES = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                 "pad_token": "padding_token_id"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: every byte-level BPE token is spelt in it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre in SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in DIGITS_FIRST:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # "gpt2", "default" and the rest


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """A SentencePiece vocabulary's merges, which GGUF does not store: every split of a token into two tokens,
    the pairs ordered by the merged token's score, best first (as transformers' `generate_merges` orders them)."""
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ids and token[i:] in ids]
        merges += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (ids[p[0]], ids[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(meta: dict, where: str):
    """Llama 2 / Mistral / TinyLlama style: SentencePiece BPE with byte fallback, "▁" for spaces, one prefix
    space before the text (transformers' LlamaTokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, scores = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.scores")
    if not tokens or not scores or len(scores) != len(tokens):
        raise KilnError(f"{where}: the SentencePiece tokenizer has no tokens or no scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_scores(tokens, scores), fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
                    if k == USER_DEFINED])
    return tok, tokens


def _byte_level(meta: dict, where: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise KilnError(f"{where}: the tokenizer has no tokens or no merges")
    alphabet = bytes_to_unicode()
    letters = set(alphabet.values())
    spelt = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelt)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(spelt, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(spelt, types) if k == USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    return tok, spelt


def tokenizer_from_gguf(meta: dict, where: str):
    """A `tokenizers.Tokenizer` from a GGUF file's metadata: a byte-level BPE (`gpt2`: GPT-2, Llama 3, Qwen2,
    SmolLM) or a SentencePiece BPE (`llama`: Llama 2, Mistral, TinyLlama)."""
    from tokenizers import processors

    model = meta.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise KilnError(f"{where}: tokenizer model {model!r} is not supported (kiln reads byte-level BPE "
                        "vocabularies, tokenizer.ggml.model 'gpt2', and SentencePiece BPE ones, 'llama')")
    tok, spelt = _byte_level(meta, where) if model == "gpt2" else _sentencepiece(meta, where)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama")  # llama.cpp's default for SentencePiece
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{spelt[bos]} $A", pair=f"{spelt[bos]} $A $B",
                                                           special_tokens=[(spelt[bos], bos)])
    elif model == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def special_tokens(meta: dict) -> dict:
    """tokenizer_config.json's special-token entries (bos_token, eos_token, ...) and add_bos_token."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    out = {}
    for role, key in SPECIAL_ROLES.items():
        i = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(i, int) and 0 <= i < len(tokens):
            out[role] = tokens[i]
    out["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    return out


# ----------------------------------------------------------------------------------------------- export


def gguf_tokenizer_fields(tokenizer_json: str, vocab_size: int, specials: dict) -> dict:
    """The GGUF tokenizer metadata (key -> value) of a byte-level BPE tokenizer.json (`gpt2`) or a SentencePiece
    BPE one (`llama`: merges become scores), padded to the model's vocab_size with unused control tokens
    (llama.cpp wants one token per embedding row)."""
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    spm = model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "Metaspace" in json.dumps(spec)
    if model.get("type") != "BPE" or not (spm or _is_byte_level(spec)):
        raise KilnError("GGUF export needs a byte-level BPE tokenizer (GPT-2 / Llama 3 / SmolLM style) or a "
                        "SentencePiece BPE one (Llama 2 style); this run's tokenizer.json is "
                        f"{model.get('type', 'unknown')}")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise KilnError(f"the tokenizer has ids up to {max(by_id)}, more than the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(CONTROL)
            continue
        tokens.append(by_id[i])
        byte = spm and len(by_id[i]) == 6 and by_id[i].startswith("<0x") and by_id[i].endswith(">")
        types.append((CONTROL if added[i].get("special") else USER_DEFINED) if i in added else BYTE if byte else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = {t: i for i, t in enumerate(tokens)}
    out = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
           "tokenizer.ggml.add_bos_token": bool(specials.get("add_bos_token", spm))}
    if spm:
        out.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": _scores(tokens, merges)})
    else:
        out.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(spec),
                    "tokenizer.ggml.merges": merges})
    for role, key in SPECIAL_ROLES.items():
        if specials.get(role) in ids:
            out[f"tokenizer.ggml.{key}"] = ids[specials[role]]
    return out


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that order the merges as the list does: a token scores minus the rank of the first
    merge that makes it (merges_from_scores rebuilds the same list); a token no merge makes scores below all."""
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first.setdefault(merge.replace(" ", "", 1), rank)
    return [-float(first.get(t, len(merges) + i)) for i, t in enumerate(tokens)]


def _is_byte_level(spec: dict) -> bool:
    return '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")) and '"ByteLevel"' in json.dumps(spec.get("decoder"))


def _pre_name(spec: dict) -> str:
    """The `tokenizer.ggml.pre` name whose split matches this tokenizer.json's pre-tokenizer."""
    pre = json.dumps(spec.get("pre_tokenizer"))
    for name in ("llama-bpe", "qwen2"):
        if json.dumps(SPLITS[name])[1:-1] in pre:
            return name
    return "smollm" if '"Digits"' in pre else "gpt2"
