"""Feeds docs/benchmarks.md, section 'Translation: English → Spanish, from scratch' (and docs/translate_bleu.png).

English -> Spanish on the Bible for a wall-clock budget: BLEU/chrF on >= 1000 held-out verses + the curve.

Trains configs/translate-en-es.yaml (a small Transformer for 2 CPU cores) on bible_en_es.tsv with
`kiln finetune seq2seq`, its lr schedule stretched to the time budget (evaluations included; the final test
decode is not), then decodes the 1000 held-out test verses (identical English verses never straddle splits)
with the best checkpoint (by validation BLEU). Prints the validation BLEU per evaluation and the test scores;
the run folder holds plots/bleu.png, plots/loss.png, eval/test.json, eval/test_outputs.tsv, samples.txt.

    python experiments/translate_bible.py --data /path/to/bible_en_es.tsv                 # 60 minutes
    python experiments/translate_bible.py --data /path/to/bible_en_es.tsv --minutes 3 --num-beams 1   # smoke
    python experiments/translate_bible.py --data ... -- --model.d_model 192 --train.batch_size 32     # overrides
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py: machine facts, JSON
from common import machine  # noqa: E402

from kiln.config import Seq2SeqConfig, load_config  # noqa: E402
from kiln.api import finetune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="bible_en_es.tsv (header ref, en, es)")
    p.add_argument("--minutes", type=float, default=60.0, help="training budget in minutes (evaluations included)")
    p.add_argument("--config", default=str(ROOT / "configs" / "translate-en-es.yaml"))
    p.add_argument("--out", default="", help="run folder (default runs/translate-bible-<timestamp>)")
    p.add_argument("--num-beams", type=int, default=0, help="beams of the final test decode (default: the config's)")
    p.add_argument("--test-size", type=int, default=1000, help="held-out test verses (>= 1000 for the report)")
    p.add_argument("overrides", nargs="*", help="further --section.key VALUE overrides (after --)")
    a = p.parse_args(argv)

    out = a.out or f"runs/translate-bible-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = ["--data.train", a.data, "--out", out, "--seq2seq.time_budget", str(a.minutes),
                 "--data.test_size", str(a.test_size), "--train.max_steps", "1000000", "--train.tensorboard", "false"]
    if a.num_beams:
        overrides += ["--seq2seq.num_beams", str(a.num_beams)]
    cfg = load_config(a.config, overrides + list(a.overrides), cls=Seq2SeqConfig)
    cfg.out = out
    print(f"machine: {machine()}", flush=True)
    t0 = time.perf_counter()
    run_dir = finetune("seq2seq", cfg)
    wall = time.perf_counter() - t0
    res = json.loads((run_dir / "eval" / "test.json").read_text())
    train, test = res["train"], res.get("test", {})
    curve = [(h["step"], h.get("val_bleu"), h.get("val_chrf")) for h in train["history"]]
    print("\nvalidation curve (greedy, fixed subset):")
    print(f"  {'step':>6} {'BLEU':>6} {'chrF':>6}")
    for step, bleu, chrf in curve:
        print(f"  {step:>6} {bleu:>6.2f} {chrf:>6.2f}")
    print(f"\ntrained {train['steps']} steps in {train['seconds'] / 60:.1f} min (budget {a.minutes:g}); best "
          f"checkpoint step {train['best_step']}")
    if test:
        print(f"test: {test['examples']} held-out verses, beam {test['num_beams']}: BLEU {test['bleu']:.2f}, "
              f"chrF {test['chrf']:.2f} (decoded in {test['decode_seconds']:.0f}s)")
    print(f"wall time {wall / 60:.1f} min; curve: {run_dir / 'plots' / 'bleu.png'}; outputs: "
          f"{run_dir / 'eval' / 'test_outputs.tsv'}")
    summary = {"minutes": a.minutes, "wall_seconds": wall, "steps": train["steps"], "best_step": train["best_step"],
               "curve": curve, "test": test, "machine": machine(), "run_dir": str(run_dir)}
    (run_dir / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
