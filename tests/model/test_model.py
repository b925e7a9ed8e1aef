import pytest
import torch

from kiln.model.config import PRESETS, ModelConfig, preset
from kiln.model.transformer import Transformer


def tiny(**kw):
    base = dict(vocab_size=50, n_layer=2, n_head=4, d_model=32, context_length=48)
    return Transformer(ModelConfig(**{**base, **kw}))


@pytest.mark.parametrize("kw", [dict(), dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False,
                                                n_kv_head=2, tie_embeddings=False)])
def test_greedy_with_and_without_cache_is_identical(kw):
    torch.manual_seed(0)
    model = tiny(**kw)
    prompt = torch.randint(0, 50, (3, 7))
    cached = model.generate(prompt, 25, greedy=True, use_cache=True)
    uncached = model.generate(prompt, 25, greedy=True, use_cache=False)
    assert cached.shape == (3, 32)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_matches_single_prompts():
    torch.manual_seed(0)
    model = tiny(position="rope", norm="rmsnorm")
    a, b = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :3] = 0
    out = model.generate(batch, 10, greedy=True, attention_mask=mask)
    assert torch.equal(out[0, 6:], model.generate(a, 10, greedy=True)[0, 6:])
    assert torch.equal(out[1, 6:], model.generate(b, 10, greedy=True)[0, 3:])


def test_sampling_is_seeded_and_respects_top_k():
    torch.manual_seed(0)
    model = tiny()
    prompt = torch.randint(0, 50, (1, 4))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(model.generate(prompt, 20, top_k=5, generator=g1), model.generate(prompt, 20, top_k=5, generator=g2))
    from kiln.model.generate import filter_logits

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randint(0, 50, (1, 10))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 50
    assert torch.allclose(model(x)[0, :7], model(y)[0, :7], atol=1e-6)


def test_encoder_is_bidirectional_and_masks_padding():
    torch.manual_seed(0)
    model = tiny(arch="encoder", type_vocab_size=2, embedding_norm=True, pre_norm=False).eval()
    x = torch.randint(1, 50, (2, 8))
    h = model.encode(x)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 50
    assert not torch.allclose(model.encode(y)[:, 0], h[:, 0])  # the first position sees the last
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    padded = model.encode(torch.cat([x[1:, :5], torch.zeros(1, 3, dtype=torch.long)], 1), src_mask=mask[1:])
    assert torch.allclose(padded[0, :5], model.encode(x[1:, :5])[0], atol=1e-5)


def test_encoder_decoder_uses_source_and_caches_cross_attention():
    torch.manual_seed(0)
    model = tiny(arch="encoder-decoder", position="sinusoidal").eval()
    src, tgt = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 5))
    logits = model(tgt, src=src)
    assert logits.shape == (2, 5, 50)
    assert not torch.allclose(logits, model(tgt, src=torch.randint(0, 50, (2, 9))))
    # incremental decoding with self- and cross-attention caches equals the full pass
    memory = model.encode(src)
    caches, cross = model.new_caches(2, 5), model.new_caches(2, 9)
    steps = [model(tgt[:, i:i + 1], memory=memory, caches=caches, cross_caches=cross) for i in range(5)]
    assert torch.allclose(torch.cat(steps, 1), logits, atol=1e-5)


def test_presets_build_on_meta_device():
    for name in PRESETS:
        with torch.device("meta"):
            model = Transformer(preset(name))
        assert model.num_parameters() > 0
    with torch.device("meta"):
        assert 123e6 < Transformer(preset("gpt2")).num_parameters() < 125e6


def test_generation_runs_past_the_context_window_like_nanogpt():
    torch.manual_seed(0)
    model = tiny(context_length=16)
    prompt = torch.randint(0, 50, (2, 5))
    cached = model.generate(prompt, 40, greedy=True)
    assert cached.shape == (2, 45)
    assert torch.equal(cached, model.generate(prompt, 40, greedy=True, use_cache=False))
    # each token past the window depends only on the previous 16
    with torch.no_grad():
        last = model(cached[:, -17:-1].clone())[:, -1].argmax(-1)
    assert torch.equal(last, cached[:, -1])


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_head_cross_entropy_matches_plain_loss_and_grads(with_bias):
    import torch.nn.functional as F

    from kiln.model.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(50, 16, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(50, generator=g, dtype=torch.float64).requires_grad_() if with_bias else None
    t = torch.randint(0, 50, (37,), generator=g)
    t[::5] = -100  # ignored rows
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum", ignore_index=-100)
    ref_grads = torch.autograd.grad(ref * 0.3, [h, w] + ([b] if with_bias else []))
    got = linear_cross_entropy(h, w, t, b, chunk=8)  # several chunks, the last one partial
    got_grads = torch.autograd.grad(got * 0.3, [h, w] + ([b] if with_bias else []))
    assert got.dtype == torch.float64  # fp32 at least: float64 inputs keep float64
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    for a, r in zip(got_grads, ref_grads):
        assert a.dtype == r.dtype and torch.allclose(a, r, atol=1e-12, rtol=1e-9)


def test_model_labels_give_the_summed_loss_and_same_gradients_in_fp32_and_bf16():
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = tiny()
    x, y = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    probe = [next(m.decoder.blocks[0].parameters()), m.lm_head.weight]
    plain = F.cross_entropy(m(x).flatten(0, 1), y.flatten(), reduction="sum")
    g_plain = torch.autograd.grad(plain, probe)
    fused = m(x, labels=y)
    g_fused = torch.autograd.grad(fused, probe)
    assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    for a, b in zip(g_fused, g_plain):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 softmax: close to fp32
        fused_bf16 = m(x, labels=y)
    assert fused_bf16.dtype == torch.float32
    assert float(fused_bf16.detach()) == pytest.approx(float(plain.detach()), rel=2e-2)
    fused_bf16.backward()
    assert m.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(m.lm_head.weight.grad).all()


def test_packed_linears_match_plain_linears_and_follow_weight_updates():
    from kiln.model.packed import available, packed_linears

    if not available("cpu"):
        pytest.skip("this torch build has no oneDNN")  # CPU wheels for x86 and arm64 have it
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        plain = m(x)
        with packed_linears(m):
            assert "forward" in m.lm_head.__dict__  # patched inside the block
            packed = m(x)
            with packed_linears(m):  # nested (generate -> beam search): the outer block keeps its patch
                pass
            assert "forward" in m.lm_head.__dict__
        assert "forward" not in m.lm_head.__dict__  # restored after it
        assert torch.allclose(packed, plain, atol=1e-5, rtol=1e-5)
        m.decoder.blocks[0].mlp.down_proj.weight.mul_(2.0)
        changed = m(x)
        with packed_linears(m):
            assert torch.allclose(m(x), changed, atol=1e-5, rtol=1e-5)  # repacked after the in-place update
    assert not torch.allclose(changed, plain)


def test_masked_lm_labels_run_the_head_on_targets_only_with_the_same_loss():
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = tiny(arch="encoder", mlm_head=True, tie_embeddings=True)
    x = torch.randint(0, 50, (2, 10))
    y = torch.full_like(x, -100)
    y[0, 3], y[1, 7], y[1, 8] = 4, 9, 11
    keep = y != -100
    plain = F.cross_entropy(m(x)[keep], y[keep], reduction="sum")
    fused = m(x, labels=y)
    assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    (g_plain,) = torch.autograd.grad(plain, [m.head_transform.dense.weight])
    (g_fused,) = torch.autograd.grad(fused, [m.head_transform.dense.weight])
    assert torch.allclose(g_fused, g_plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_the_expected_share_scales_and_passes_gradients_through_the_kept(dtype):
    from kiln.model.transformer import Block, Dropout

    torch.manual_seed(0)
    x = torch.ones(200, 500, dtype=dtype, requires_grad=True)
    y = Dropout(0.1).train()(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    assert torch.allclose(y[kept].float(), torch.full_like(y[kept].float(), 1 / 0.9), atol=1e-2)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # dropped positions get no gradient
    assert torch.equal(Dropout(0.1).eval()(x), x)
    # one dropout per sublayer output (BERT, GPT-2): a block has no second dropout inside its feed-forward
    block = Block(ModelConfig(d_model=32, n_head=2, dropout=0.1).resolve())
    assert sum(isinstance(m, torch.nn.Dropout) for m in block.modules()) == 1
