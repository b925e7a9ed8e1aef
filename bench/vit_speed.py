"""kiln's ViT vs transformers' ViTForImageClassification: training and inference examples/s, same everything.

    .venv/bin/python bench/vit_speed.py                          # the recipe's shape (configs/vit-fashion-mnist.yaml)
    .venv/bin/python bench/vit_speed.py --steps 5 --rounds 1     # smoke test (~1 min)
    .venv/bin/python bench/vit_speed.py --precision bf16 --json bench/results/vit_speed_bf16.json

Like for like: one shape (the recipe's width, depth, heads and MLP on 28x28x1 Fashion-MNIST; a class token,
learned positions and a linear 4x4 patchify instead of the recipe's convolutional stem, because HF's ViT has
only those), the *same weights* (kiln's model exported with
`kiln export hf`'s name map and loaded into ViTForImageClassification; the logits are checked equal first), the
same batches (kiln.data.images.ImageBatches over the same images, augmentation on), the same loss (summed
cross-entropy), the same optimizer (torch AdamW, fused), the same precision (fp32, or both models' parameters and
inputs in bf16) and the same threads. Rounds are interleaved (kiln, HF, kiln, HF, ...) so a load change on a
shared machine hits both; each side's figure is the median over rounds. Prints the CPU (lscpu), torch and the
command, and writes the result as JSON (--json, default bench/results/vit_speed.json).
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
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import emit_json, machine, median  # noqa: E402

FULL = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")  # Debian's dataset-fashion-mnist
SUBSET = ROOT / "tests" / "assets" / "fashion_mnist_train-images-idx3-ubyte.gz"


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "vit-fashion-mnist.yaml"), help="recipe whose model shape is used")
    p.add_argument("--data", default=str(FULL if FULL.is_file() else SUBSET), help="IDX images file")
    p.add_argument("--batch-size", type=int, default=0, help="default: the recipe's train.batch_size")
    p.add_argument("--steps", type=int, default=20, help="training steps per side per round")
    p.add_argument("--eval-batches", type=int, default=10, help="inference batches per side per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is their median")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "vit_speed.json"))
    return p.parse_args()


def build(args):
    """(kiln ImageClassifier, HF ViTForImageClassification with the same weights, batches, config)."""
    import transformers

    from kiln.config import load_config
    from kiln.data import images as imdata
    from kiln.data.images import ImageConfig
    from kiln.interop.vit import config_to_hf, state_to_hf
    from kiln.model.heads import ImageClassifier
    from kiln.model.transformer import Transformer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = load_config(args.config, cls=ImageConfig)
    items = imdata.scan(args.data)
    images = imdata.load(items, 28, 1)
    labels = np.array([int(x) for x in items.labels], dtype=np.int64)
    # HF's ViT has a class token, learned positions and one linear patch projection only: the compared shape uses
    # them on both sides (the recipe's convolutional stem has no HF ViT counterpart: its 4x4 patches on 28x28 instead)
    m = cfg.model.with_(channels=1, image_size=28, class_token=True, position="learned", dropout=0.0, stem_channels=[],
                        patch_size=4 if cfg.model.stem_channels else cfg.model.patch_size)
    torch.manual_seed(args.seed)
    kiln_model = ImageClassifier(Transformer(m), 10, "cls")
    names = [str(i) for i in range(10)]
    state = state_to_hf({k.removeprefix("backbone."): v for k, v in kiln_model.state_dict().items()
                         if k.startswith("backbone.")}, kiln_model.backbone.config, prefix=True)
    state.update({"classifier.weight": kiln_model.head.weight.detach().clone(),
                  "classifier.bias": kiln_model.head.bias.detach().clone()})
    with tempfile.TemporaryDirectory() as tmp:  # written as `kiln export hf` writes it, loaded as HF users load it
        from safetensors.torch import save_file

        save_file(state, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        Path(tmp, "config.json").write_text(json.dumps(config_to_hf(kiln_model.backbone.config, names)))
        hf_model = transformers.ViTForImageClassification.from_pretrained(tmp, attn_implementation="sdpa")
    bs = args.batch_size or cfg.train.batch_size
    mean, std = imdata.channel_stats(images)
    batches = imdata.ImageBatches(images, labels, bs, args.seed, mean, std, cfg.augment.crop_padding, cfg.augment.flip)
    x = batches.batch(0)["pixel_values"][:8]
    with torch.no_grad():
        delta = (kiln_model.eval()(x) - hf_model.eval()(pixel_values=x).logits).abs().max().item()
    assert delta < 1e-4, f"kiln and HF logits differ by {delta}: not the same model"
    return kiln_model, hf_model, batches, m, bs, delta


def forward(side: str, model, x):
    return model(x) if side == "kiln" else model(pixel_values=x).logits


def time_train(side, model, opt, batches, first: int, steps: int, dtype) -> float:
    model.train()
    for i in range(first, first + steps + 2):
        if i == first + 2:  # two warm-up steps per round
            t0 = time.perf_counter()
        b = batches.batch(i)
        loss = F.cross_entropy(forward(side, model, b["pixel_values"].to(dtype)).float(), b["labels"], reduction="sum")
        (loss / b["labels"].shape[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batches.sampler.B / (time.perf_counter() - t0)


@torch.no_grad()
def time_eval(side, model, batches, first: int, n: int, dtype) -> float:
    model.eval()
    xs = [batches.batch(first + i)["pixel_values"].to(dtype) for i in range(n + 1)]
    forward(side, model, xs[0])
    t0 = time.perf_counter()
    for x in xs[1:]:
        forward(side, model, x)
    return n * xs[0].shape[0] / (time.perf_counter() - t0)


def main():
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    kiln_model, hf_model, batches, m, bs, delta = build(args)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    models = {"kiln": kiln_model.to(dtype), "hf": hf_model.to(dtype)}
    opts = {k: torch.optim.AdamW(v.parameters(), lr=1e-3, weight_decay=0.05, fused=True) for k, v in models.items()}
    train = {k: [] for k in models}
    infer = {k: [] for k in models}
    for r in range(args.rounds):
        for side in ("kiln", "hf"):  # interleaved: the same batches for both sides in a round
            first = r * (args.steps + 2)
            train[side].append(time_train(side, models[side], opts[side], batches, first, args.steps, dtype))
            infer[side].append(time_eval(side, models[side], batches, first, args.eval_batches, dtype))
        print(f"round {r + 1}/{args.rounds}: train kiln {train['kiln'][-1]:.0f} / HF {train['hf'][-1]:.0f} ex/s; "
              f"inference kiln {infer['kiln'][-1]:.0f} / HF {infer['hf'][-1]:.0f} ex/s", flush=True)
    import transformers

    result = {
        "benchmark": "vit_speed", "command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
        "torch": torch.__version__, "transformers": transformers.__version__, "precision": args.precision,
        "threads": torch.get_num_threads(), "data": args.data, "batch_size": bs, "steps_per_round": args.steps,
        "rounds": args.rounds, "initial_logit_delta": delta,
        "model": {"d_model": m.d_model, "n_layer": m.n_layer, "n_head": m.n_head, "d_ff": m.resolve().d_ff,
                  "patch_size": m.patch_size, "image_size": 28, "channels": 1, "tokens": m.context_length,
                  "parameters": sum(p.numel() for p in kiln_model.parameters())},
        "train_examples_per_second": {k: median(v) for k, v in train.items()},
        "inference_examples_per_second": {k: median(v) for k, v in infer.items()},
        "rounds_train": train, "rounds_inference": infer,
    }
    result["train_kiln_over_hf"] = result["train_examples_per_second"]["kiln"] / result["train_examples_per_second"]["hf"]
    result["inference_kiln_over_hf"] = (result["inference_examples_per_second"]["kiln"]
                                        / result["inference_examples_per_second"]["hf"])
    print(f"{machine()}\ncommand: {result['command']}")
    print(f"train: kiln {result['train_examples_per_second']['kiln']:.0f} ex/s, HF "
          f"{result['train_examples_per_second']['hf']:.0f} ex/s ({result['train_kiln_over_hf']:.2f}x); inference: kiln "
          f"{result['inference_examples_per_second']['kiln']:.0f}, HF {result['inference_examples_per_second']['hf']:.0f} "
          f"ex/s ({result['inference_kiln_over_hf']:.2f}x) -- median of {args.rounds} interleaved rounds")
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
