"""Beam search for decoder-only models: Hugging Face parity (GPT-2, Llama), cache, padding, num_beams=1."""

from __future__ import annotations

import pytest
import torch

import transformers

from kiln.api import load  # noqa: E402
from kiln.interop.hf import import_hf  # noqa: E402
from kiln.model.beam import beam_search_causal  # noqa: E402

V = 96
NO_PROCESSORS = dict(no_repeat_ngram_size=0, min_length=0, repetition_penalty=1.0, do_sample=False,
                     forced_eos_token_id=None, forced_bos_token_id=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run faster on one thread


def _config(family):
    small = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **small)
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                                    **small)


# eos: a token each random model emits often, so beams finish at many different lengths (and some run to the end)
EOS = {"gpt2": 13, "llama": 64}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request, tmp_path_factory):
    """(family, HF model, kiln model): random tiny weights with noise on every parameter."""
    family = request.param
    path = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    hf.save_pretrained(path / "hf")
    model, _, _ = load(import_hf(path / "hf", path / "run"))
    return family, hf, model


def prompts():
    """Two prompts, left-padded: lengths 7 and 4."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_beam_search_matches_huggingface(models):
    family, hf, model = models
    eos = EOS[family]
    ids, mask = prompts()
    ends, picks = set(), {}
    for lp in (0.5, 1.0, 2.0):
        for es in (True, False):
            ref = hf.generate(ids, attention_mask=mask, max_new_tokens=14, num_beams=4, length_penalty=lp,
                              early_stopping=es, eos_token_id=eos, pad_token_id=eos, output_scores=True,
                              return_dict_in_generate=True, **NO_PROCESSORS)
            out = beam_search_causal(model, ids, mask, num_beams=4, max_new_tokens=14, eos_id=eos, length_penalty=lp,
                                     early_stopping=es)
            assert torch.equal(ref.sequences, out.sequences), (family, lp, es, ref.sequences, out.sequences)
            assert torch.allclose(ref.sequences_scores, out.scores, atol=1e-5)
            got = model.generate(ids, 14, num_beams=4, length_penalty=lp, early_stopping=es, eos_token_id=eos,
                                 attention_mask=mask)
            assert torch.equal(got, out.sequences)
            new = out.sequences[:, ids.shape[1]:].tolist()
            ends |= {r.index(eos) if eos in r else -1 for r in new}
            picks[(lp, es)] = tuple(map(tuple, new))
    assert -1 in ends and len(ends - {-1}) >= 3  # ended by eos at several lengths, and by max length
    assert len(set(picks.values())) >= 2  # the settings changed the outcome somewhere


def test_cache_padding_and_one_beam(models):
    family, hf, model = models
    eos = EOS[family]
    ids, mask = prompts()
    args = dict(num_beams=3, max_new_tokens=12, eos_id=eos, length_penalty=1.0, early_stopping=False)
    cached = beam_search_causal(model, ids, mask, **args)
    uncached = beam_search_causal(model, ids, mask, use_cache=False, **args)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.allclose(cached.scores, uncached.scores, atol=1e-5)
    for i in range(2):  # each prompt of a padded batch decodes as if it were alone
        n = int(mask[i].sum())
        alone = beam_search_causal(model, ids[i:i + 1, -n:], None, **args)
        row = cached.sequences[i, ids.shape[1] - n:][:alone.sequences.shape[1]]
        assert alone.sequences[0].tolist() == row.tolist()
        assert float(alone.scores[0]) == pytest.approx(float(cached.scores[i]), abs=1e-5)
    greedy = model.generate(ids, 12, greedy=True, attention_mask=mask, eos_token_id=eos)
    assert torch.equal(model.generate(ids, 12, greedy=True, attention_mask=mask, eos_token_id=eos, num_beams=1),
                       greedy)
    one = beam_search_causal(model, ids, mask, **{**args, "num_beams": 1, "early_stopping": True})
    assert torch.equal(one.sequences, greedy)


def test_generate_cli_num_beams(models, tmp_path, capsys):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    from kiln.cli import main
    from kiln.run.checkpoint import find_checkpoint

    family, hf, _ = models
    hf.save_pretrained(tmp_path / "hf")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    tok = Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(find_checkpoint(run, "latest").parent.parent / "tokenizer.json"))
    model, _, _ = load(run)
    prompt = [5, 17, 42]
    want = model.generate(torch.tensor([prompt]), 6, num_beams=3)
    assert main(["generate", str(run), "--prompt", "t5 t17 t42", "--max-new-tokens", "6", "--num-beams", "3",
                 "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.strip() == tok.decode(prompt) + tok.decode(want[0, len(prompt):].tolist())
