"""Feeds docs/benchmarks.md, section 'A BERT-style encoder pretrained from scratch, then fine-tuned' (its positions table).

Why a from-scratch MLM stalls: position encodings and the masked-LM plateau, in one loop.

Char-level masked LM on tiny Shakespeare (15% of the characters, 80/10/10), the same loop, data, masks and
optimizer for every model; masked-token accuracy on fixed held-out masks every `--eval-every` steps:

  - kiln encoder, learned absolute positions (BERT's choice), post-LN as BERT and pre-LN;
  - kiln encoder, rotary positions (RoPE), pre-LN;
  - Hugging Face `BertForMaskedLM` at the same size (learned positions, post-LN) as the outside reference.

A char MLM can only beat the unigram guess (~2.9 nats, ~20% accuracy) by attending to its neighbours: the
masked position's own input is [MASK]. With learned positions the model must first learn where the neighbours
are, which is the long plateau seen when pretraining BERT-style encoders from scratch.

    python experiments/mlm_positions.py --steps 600
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py: machine facts, JSON
from common import emit_json, machine  # noqa: E402

from kiln.model.config import ModelConfig  # noqa: E402
from kiln.model.transformer import Transformer  # noqa: E402
from kiln.train.mlm import IGNORE, MaskedLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(name: str, vocab: int, a) -> torch.nn.Module:
    if name == "hf-bert":
        from transformers import BertConfig, BertForMaskedLM

        hf = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=a.width, num_hidden_layers=a.layers,
                                        num_attention_heads=4, intermediate_size=4 * a.width,
                                        max_position_embeddings=a.context, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0))

        class Logits(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.hf = hf

            def forward(self, idx):
                return self.hf(input_ids=idx).logits

        return Logits()
    position, pre = {"kiln-learned-postln": ("learned", False), "kiln-learned-preln": ("learned", True),
                     "kiln-rope-preln": ("rope", True)}[name]
    cfg = ModelConfig(arch="encoder", vocab_size=vocab, n_layer=a.layers, n_head=4, d_model=a.width,
                      context_length=a.context, position=position, pre_norm=pre, final_norm=pre,
                      embedding_norm=not pre, dropout=0.0).resolve()
    return Transformer(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--models", default="kiln-learned-postln,kiln-learned-preln,kiln-rope-preln,hf-bert")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    text = (ROOT / "src" / "kiln" / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text])
    cut = int(0.9 * len(data))
    vocab = len(chars) + 1  # + [MASK]
    mlm = MaskedLM(vocab, vocab - 1, [], 0.15, space=torch.tensor([c.isspace() for c in chars] + [False]), seed=0)

    def windows(split: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        ix = torch.randint(0, len(split) - a.context - 1, (n,), generator=g)
        return torch.stack([split[i:i + a.context + 1] for i in ix.tolist()])

    val = [windows(data[cut:], a.batch, 10**6 + i) for i in range(8)]  # masked the same way at every eval
    results = {}
    for name in a.models.split(","):
        torch.manual_seed(0)
        model = build(name, vocab, a)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)
        curve, t0 = [], time.perf_counter()
        for step in range(1, a.steps + 1):
            b = mlm.mask(windows(data[:cut], a.batch, step), step)
            logits = model(b["input_ids"])
            picked = b["labels"] != IGNORE
            loss = F.cross_entropy(logits[picked].float(), b["labels"][picked])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % a.eval_every == 0:
                curve.append((step, round(mlm.evaluate(model, lambda: iter(val))["mlm_accuracy"], 4)))
        results[name] = {"accuracy_by_step": curve, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:22s} " + "  ".join(f"{s}:{acc:.1%}" for s, acc in curve), flush=True)
    emit_json({"machine": machine(), "config": vars(a) | {"json": str(a.json)}, "results": results}, a.json)


if __name__ == "__main__":
    main()
