"""kiln's CTC model vs transformers' Wav2Vec2ForCTC: training examples/s at the same config, data and precision.

    .venv/bin/python bench/asr_speed.py --data data/speech/asr/train.csv      # the recipe's shape (configs/asr-digits.yaml)
    .venv/bin/python bench/asr_speed.py --steps 3 --rounds 1                   # smoke test on synthetic noise

Like for like: one shape (the recipe's model section), the *same weights* (kiln's model mapped with `kiln export
hf`'s name map into Wav2Vec2ForCTC; the logits are checked equal first), the same batches (kiln.data.audio's
AudioBatches: padded waveforms + attention masks, the same character targets), the same loss (torch's CTC loss,
summed, over the valid frames), the same optimizer (torch AdamW), the same precision (fp32, or both models'
parameters and inputs in bf16) and the same threads. Every dropout, HF's layerdrop and SpecAugment are off on both
sides. Rounds are interleaved (kiln, HF, kiln, HF, ...) so a load change on a shared machine hits both; each
side's figure is the median over rounds. Writes the result as JSON (--json, default bench/results/asr_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import emit_json, machine, median  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "asr-digits.yaml"), help="recipe whose model shape is used")
    p.add_argument("--data", default="", help="a manifest of path,text (default: 64 utterances of noise, 1.5-4 s)")
    p.add_argument("--batch-size", type=int, default=0, help="default: the recipe's train.batch_size")
    p.add_argument("--steps", type=int, default=10, help="training steps per side per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is their median")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "asr_speed.json"))
    return p.parse_args()


def data(args, cfg):
    """(normalised waveforms, character id lists, vocab)."""
    from kiln.data import audio as adata
    from kiln.eval import speech as sp

    if args.data:
        clips = adata.scan(args.data, "text")
        waves, kept, _ = adata.load_waveforms(clips, cfg.model.sample_rate, cfg.data.max_seconds, "skip")
        texts = [sp.clean(clips.targets[i], True) for i in kept]
    else:
        rng = np.random.default_rng(args.seed)
        waves = [adata.normalise(rng.normal(size=int(cfg.model.sample_rate * rng.uniform(1.5, 4))).astype(np.float32))
                 for _ in range(64)]
        texts = [" ".join(rng.choice(["one", "two", "three", "four"], int(rng.integers(3, 8)))) for _ in waves]
    vocab = sp.build_vocab(texts)
    index = {t: i for i, t in enumerate(vocab)}
    return waves, [sp.encode(t, index) for t in texts], vocab


def build(args):
    """(kiln CTCModel, HF Wav2Vec2ForCTC with the same weights, batches, model config, logit delta)."""
    import transformers

    from kiln.config import load_config
    from kiln.data.audio import AudioBatches
    from kiln.data.audio_config import ASRConfig
    from kiln.interop.wav2vec2 import config_to_hf, state_to_hf
    from kiln.model.audio import CTCModel
    from kiln.model.transformer import Transformer
    from kiln.tasks.asr import collate

    transformers.logging.set_verbosity_error()
    cfg = load_config(args.config, cls=ASRConfig)
    waves, ids, vocab = data(args, cfg)
    m = cfg.model.with_(dropout=0.0)
    torch.manual_seed(args.seed)
    kiln_model = CTCModel(Transformer(m), len(vocab))
    state = state_to_hf({k.removeprefix("backbone."): v for k, v in kiln_model.state_dict().items()
                         if k.startswith("backbone.")}, m, prefix=True)
    state.update({"lm_head.weight": kiln_model.lm_head.weight.detach().clone(),
                  "lm_head.bias": kiln_model.lm_head.bias.detach().clone()})
    hf_cfg = {**config_to_hf(m, "Wav2Vec2ForCTC"), "vocab_size": len(vocab), "mask_time_prob": 0.0,
              "apply_spec_augment": False, "ctc_loss_reduction": "sum", "ctc_zero_infinity": True}
    with tempfile.TemporaryDirectory() as tmp:  # written as `kiln export hf` writes it, loaded as HF users load it
        from safetensors.torch import save_file

        save_file(state, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        Path(tmp, "config.json").write_text(json.dumps(hf_cfg))
        hf_model = transformers.Wav2Vec2ForCTC.from_pretrained(tmp, attn_implementation="sdpa")
    bs = args.batch_size or cfg.train.batch_size
    batches = AudioBatches(waves, collate(ids), bs, args.seed)
    b = batches.batch(0)
    with torch.no_grad():
        a, n = kiln_model.eval()(b["input_values"][:1], b["attention_mask"][:1])
        h = hf_model.eval()(b["input_values"][:1], attention_mask=b["attention_mask"][:1]).logits
        delta = (a[:, :int(n[0])] - h[:, :int(n[0])]).abs().max().item()
    assert delta < 1e-4, f"kiln and HF logits differ by {delta}: not the same model"
    return kiln_model, hf_model, batches, m, bs, delta


def loss_of(side: str, model, b, dtype):
    x, mask = b["input_values"].to(dtype), b["attention_mask"]
    if side == "kiln":
        logits, frames = model(x, mask)
    else:
        logits = model(x, attention_mask=mask).logits
        frames = model._get_feat_extract_output_lengths(mask.sum(-1))
    lp = logits.float().log_softmax(-1).transpose(0, 1)
    return F.ctc_loss(lp, b["labels"], frames, b["label_lengths"], blank=0, reduction="sum", zero_infinity=True)


def time_train(side, model, opt, batches, first: int, steps: int, dtype) -> float:
    model.train()
    n = 0
    for i in range(first, first + steps + 2):
        if i == first + 2:  # two warm-up steps per round
            t0 = time.perf_counter()
        b = batches.batch(i)
        (loss_of(side, model, b, dtype) / b["label_lengths"].sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += b["input_values"].shape[0] if i >= first + 2 else 0
    return n / (time.perf_counter() - t0)


def main():
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    kiln_model, hf_model, batches, m, bs, delta = build(args)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    models = {"kiln": kiln_model.to(dtype), "hf": hf_model.to(dtype)}
    opts = {k: torch.optim.AdamW(v.parameters(), lr=1e-3, weight_decay=0.01) for k, v in models.items()}
    train = {k: [] for k in models}
    for r in range(args.rounds):
        for side in ("kiln", "hf"):  # interleaved: the same batches for both sides in a round
            train[side].append(time_train(side, models[side], opts[side], batches, r * (args.steps + 2), args.steps, dtype))
        print(f"round {r + 1}/{args.rounds}: train kiln {train['kiln'][-1]:.1f} / HF {train['hf'][-1]:.1f} ex/s", flush=True)
    import transformers

    result = {
        "benchmark": "asr_speed", "command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
        "torch": torch.__version__, "transformers": transformers.__version__, "precision": args.precision,
        "threads": torch.get_num_threads(), "data": args.data or "noise", "batch_size": bs,
        "steps_per_round": args.steps, "rounds": args.rounds, "initial_logit_delta": delta,
        "model": {"d_model": m.d_model, "n_layer": m.n_layer, "conv_dim": m.audio_conv_dim,
                  "sample_rate": m.sample_rate, "parameters": sum(p.numel() for p in kiln_model.parameters())},
        "train_examples_per_second": {k: median(v) for k, v in train.items()}, "rounds_train": train,
    }
    result["train_kiln_over_hf"] = result["train_examples_per_second"]["kiln"] / result["train_examples_per_second"]["hf"]
    print(f"{machine()}\ncommand: {result['command']}")
    print(f"train: kiln {result['train_examples_per_second']['kiln']:.1f} ex/s, HF "
          f"{result['train_examples_per_second']['hf']:.1f} ex/s ({result['train_kiln_over_hf']:.2f}x) -- median of "
          f"{args.rounds} interleaved rounds")
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
