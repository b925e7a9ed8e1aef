"""Beam search for decoder-only models: Hugging Face parity (GPT-2, Llama), cache, padding, num_beams=1."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kiln.api import load  # noqa: E402
from kiln.interop.hf import import_hf  # noqa: E402
from kiln.model.beam import beam_search_causal  # noqa: E402

V, EOS = 96, 2
NO_PROCESSORS = dict(no_repeat_ngram_size=0, min_length=0, repetition_penalty=1.0, do_sample=False,
                     forced_eos_token_id=None, forced_bos_token_id=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(family):
    small = dict(vocab_size=V, bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **small)
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                                    **small)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request, tmp_path_factory):
    """(HF model, kiln model): random weights with noise, and a constant boost of the eos logit (through the
    final norm's bias / weight along the tied eos embedding) so hypotheses end at many different lengths."""
    family = request.param
    path = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        e = hf.get_input_embeddings().weight[EOS]
        if family == "gpt2":
            hf.transformer.ln_f.bias += 2.5 * e / e.dot(e)
        else:  # RMSNorm has no bias: add an input-independent direction through the last MLP's down_proj bias-free
            hf.lm_head.weight[EOS] *= 1.0  # tied: leave as is
            hf.model.norm.weight.mul_(1.0)
    hf.save_pretrained(path / "hf")
    model, _, _ = load(import_hf(path / "hf", path / "run"))
    return family, hf, model


def prompts():
    """Two prompts, left-padded: lengths 7 and 4."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids.masked_fill(mask == 0, EOS), mask


def test_beam_search_matches_huggingface(models):
    family, hf, model = models
    ids, mask = prompts()
    ends, picks = set(), {}
    for lp in (0.5, 1.0, 2.0):
        for es in (True, False):
            ref = hf.generate(ids, attention_mask=mask, max_new_tokens=14, num_beams=4, length_penalty=lp,
                              early_stopping=es, eos_token_id=EOS, pad_token_id=EOS, output_scores=True,
                              return_dict_in_generate=True, **NO_PROCESSORS)
            out = beam_search_causal(model, ids, mask, num_beams=4, max_new_tokens=14, eos_id=EOS, length_penalty=lp,
                                     early_stopping=es)
            assert torch.equal(ref.sequences, out.sequences), (family, lp, es, ref.sequences, out.sequences)
            assert torch.allclose(ref.sequences_scores, out.scores, atol=1e-5)
            got = model.generate(ids, 14, num_beams=4, length_penalty=lp, early_stopping=es, eos_token_id=EOS,
                                 attention_mask=mask)
            assert torch.equal(got, out.sequences)
            new = out.sequences[:, ids.shape[1]:].tolist()
            ends |= {r.index(EOS) if EOS in r else -1 for r in new}
            picks[(lp, es)] = tuple(map(tuple, new))
    assert len(ends) >= 3  # hypotheses ended at different lengths
    assert len(set(picks.values())) >= 2  # the settings changed the outcome somewhere


def test_cache_padding_and_one_beam(models):
    family, hf, model = models
    ids, mask = prompts()
    args = dict(num_beams=3, max_new_tokens=12, eos_id=EOS, length_penalty=1.0, early_stopping=False)
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
    greedy = model.generate(ids, 12, greedy=True, attention_mask=mask, eos_token_id=EOS)
    assert torch.equal(model.generate(ids, 12, greedy=True, attention_mask=mask, eos_token_id=EOS, num_beams=1),
                       greedy)
    one = beam_search_causal(model, ids, mask, **{**args, "num_beams": 1, "early_stopping": True})
    assert torch.equal(one.sequences, greedy)
