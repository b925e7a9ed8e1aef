"""The race, product vs product: `make demo`'s command against nanoGPT's own train.py, whole processes, one machine.

(a) kiln:    kiln pretrain configs/shakespeare-char.yaml --out TMP      (exactly what `make demo` runs)
(b) nanoGPT: python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
             --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
             --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0            (its README's CPU command)

kiln's time = from launching the process to the evaluation line that first reads val_loss <= target (start-up,
data preparation, the precision probe and every evaluation before it included). nanoGPT's = its whole
2,000-iteration run, launch to exit (the issue's yardstick), and its own time to the target when it gets there.
The two estimate val loss differently (kiln: 240 fixed windows of the last 10%; nanoGPT: 20 random batches of
its last 10%), which is why both are printed. Rounds alternate a then b; medians over rounds.

    python bench/race_nanogpt.py --nanogpt PATH_TO_NANOGPT_CHECKOUT [--rounds 3] [--target 1.88] [--json F]

nanoGPT is not vendored: clone https://github.com/karpathy/nanoGPT anywhere; this script writes its
data/shakespeare_char/{train,val}.bin from kiln's embedded copy of tiny Shakespeare (its prepare.py's encoding:
sorted characters) if they are missing.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NANO_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
             "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
             "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def prepare_nanogpt_data(nano: Path) -> None:
    d = nano / "data" / "shakespeare_char"
    if (d / "train.bin").exists() and (d / "val.bin").exists():
        return
    text = (ROOT / "src" / "kiln" / "assets" / "tinyshakespeare.txt").read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    for name, part in (("train", text[:int(n * 0.9)]), ("val", text[int(n * 0.9):])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(d / f"{name}.bin")
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def timed(cmd: list[str], cwd: Path, val_re: str, target: float) -> dict:
    """Run cmd; return wall seconds, the first time a line's val loss was <= target, and the last val loss."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    reached, last, curve = None, None, []
    for line in p.stdout:
        m = re.search(val_re, line)
        if m:
            last = float(m.group(2))
            curve.append((int(m.group(1)), round(time.perf_counter() - t0, 2), last))
            if reached is None and last <= target:
                reached = round(time.perf_counter() - t0, 2)
    if p.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode})")
    return {"wall_s": round(time.perf_counter() - t0, 2), "time_to_target_s": reached, "final_val": last,
            "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nanogpt", required=True, help="a nanoGPT checkout (karpathy/nanoGPT)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / (Path(__file__).stem + ".json")))
    args = ap.parse_args()
    nano = Path(args.nanogpt).resolve()
    if not (nano / "train.py").exists():
        raise SystemExit(f"--nanogpt {nano}: no train.py there (clone https://github.com/karpathy/nanoGPT)")
    prepare_nanogpt_data(nano)
    kiln_cmd = [str(Path(sys.executable).parent / "kiln"), "pretrain", str(ROOT / "configs" / "shakespeare-char.yaml")]
    rows: dict[str, list] = {"kiln": [], "nanogpt": []}
    with tempfile.TemporaryDirectory(prefix="kiln-race-") as tmp:
        for r in range(args.rounds):
            rows["kiln"].append(timed(kiln_cmd + ["--out", f"{tmp}/kiln{r}"], ROOT,
                                      r"step (\d+): val_loss ([0-9.]+)", args.target))
            rows["nanogpt"].append(timed([sys.executable, "train.py", *NANO_ARGS, f"--out_dir={tmp}/nano{r}"], nano,
                                         r"step (\d+): train loss [0-9.]+, val loss ([0-9.]+)", args.target))
            print(f"round {r + 1}: kiln to target {rows['kiln'][-1]['time_to_target_s']} s (whole run "
                  f"{rows['kiln'][-1]['wall_s']} s), nanoGPT 2000 iterations {rows['nanogpt'][-1]['wall_s']} s "
                  f"(final val {rows['nanogpt'][-1]['final_val']})", flush=True)
    kt = [r["time_to_target_s"] for r in rows["kiln"]]
    nw = statistics.median(r["wall_s"] for r in rows["nanogpt"])
    kmed = statistics.median(kt) if all(t is not None for t in kt) else None
    result = {"bench": "race_nanogpt", "machine": machine(), "command": " ".join(sys.argv),
              "kiln_command": " ".join(kiln_cmd + ["--out", "TMP"]),
              "nanogpt_command": "python train.py " + " ".join(NANO_ARGS), "target": args.target,
              "kiln_time_to_target_s": kmed, "nanogpt_wall_s": nw,
              "ratio": round(kmed / nw, 3) if kmed else None, "rounds": rows}
    print(f"# {machine()}")
    print(f"kiln to val <= {args.target}: {kmed} s (median of {args.rounds}); nanoGPT train.py 2,000 iterations: "
          f"{nw} s -> {result['ratio']}x (target <= 0.25x)")
    emit_json(result, args.json, echo=False)


if __name__ == "__main__":
    main()
