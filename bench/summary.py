"""`make bench`: the product-vs-product comparisons, shortened to fit ~15 minutes on 2 cores, in one table.

Each row is one of the benchmarks in this folder run with fewer rounds or steps than its full form (the full
forms, with the figures the docs quote, are in docs/benchmarks.md); their raw JSON is written to
bench/results/ and the table to bench/results/summary.json. Run alone on the machine: another busy process
slows a 2-thread job 10-35x.

    .venv/bin/python bench/summary.py [--nanogpt PATH] [--only race,cli,generate,finetune[,fashion]]

--only runs those and reuses the others' last JSON from bench/results/ (a row's "bench s" is 0 then). `fashion`
(the Fashion-MNIST record, bench/fashion_mnist.py: its recipe trains for 20 minutes) runs only when named:
`make bench RECORDS=1` adds it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run(name: str, args: list[str], skip: bool = False) -> tuple[dict | None, float]:
    """Run one benchmark (or, with skip, reuse its last JSON in bench/results/); (result, seconds)."""
    out = RESULTS / f"{name}.json"
    if skip:
        return (json.loads(out.read_text()) if out.exists() else None), 0.0
    t0 = time.perf_counter()
    print(f"$ {' '.join(['python', *args, '--json', str(out.relative_to(HERE.parent))])}", flush=True)
    p = subprocess.run([sys.executable, *args, "--json", str(out)], cwd=HERE.parent)
    took = time.perf_counter() - t0
    if p.returncode or not out.exists():
        print(f"{name}: failed (exit {p.returncode})", flush=True)
        return None, took
    return json.loads(out.read_text()), took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nanogpt", default="", help="a karpathy/nanoGPT checkout for the race (skipped without)")
    ap.add_argument("--only", default="race,cli,generate,finetune")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    only = set(args.only.split(","))
    table = []  # (comparison, kiln, peer and its setting, ratio, target, seconds)
    if "race" in only and args.nanogpt or "race" not in only:
        r, s = run("race_nanogpt", ["bench/race_nanogpt.py", "--nanogpt", args.nanogpt, "--rounds", "1"],
                   skip="race" not in only)
        if r:
            table.append(("race to val <= 1.88 (whole runs, s; lower is better)", f"{r['kiln_time_to_target_s']}",
                          f"nanoGPT train.py 2000 it: {r['nanogpt_wall_s']}", f"{r['ratio']}x", "<= 0.25x", s))
    else:
        print("race: skipped (give --nanogpt PATH to a karpathy/nanoGPT checkout)")
    r, s = run("cli_gpt2", ["bench/cli_gpt2.py", "--steps", "2", "--rounds", "3"], skip="cli" not in only)
    if r:
        table.append(("GPT-2 124M via the CLI, batch 4x256 (tokens/s)", str(r["kiln_tokens_per_s"]),
                      f"plain HF loop {r['hf_precision']}: {r['hf_tokens_per_s']}", f"{r['ratio']}x", ">= 1.6x", s))
    r, s = run("generate_speed", ["bench/generate_speed.py", "--new", "64", "--repeats", "3"],
               skip="generate" not in only)
    if r:
        for row in r["rows"]:
            table.append((f"greedy GPT-2 124M, {row['precision']}, batch {row['batch']} (tokens/s)",
                          f"{row['kiln_tokens_per_s']}", f"HF generate {row['precision']}: {row['hf_tokens_per_s']}",
                          f"{row['ratio']}x" + ("" if row["same_tokens"] else " (tokens differ!)"), ">= 1.5x", s))
    r, s = run("minilm_vs_trainer", ["bench/minilm_vs_trainer.py", "--seeds", "0", "--epochs", "0.1", "--group-by-length"],
               skip="finetune" not in only)
    if r:
        k, h = r["summary"]["kiln"], r["summary"]["hf_trainer"]
        table.append(("MiniLM rotten_tomatoes, 1/10 epoch (examples/s)", f"{k['median_examples_per_second']:.1f}",
                      f"HF Trainer {r['hf_precision']}{', group_by_length' if r['group_by_length'] else ''}: "
                      f"{h['median_examples_per_second']:.1f}", f"{r['ratio']}x",
                      ">= 1.3x", s))
    if "fashion" in only:  # opt-in (--only ...,fashion or `make bench RECORDS=1`): the recipe's own 20 minutes
        r, s = run("fashion_mnist", ["bench/fashion_mnist.py"])
        if r:
            table.append(("Fashion-MNIST ViT from scratch, 20 min (test accuracy)", f"{100 * r['test_accuracy']:.2f}%",
                          "a 2-conv CNN: 91.6-92.5%; small ViTs after 100 epochs: 92.3-93.5%", "-", ">= 92.0%", s))
    print(f"\n# {machine()}")
    print("| comparison | kiln | peer at its best here | ratio | target | bench s |\n|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(str(c) if i < 5 else f"{c:.0f}" for i, c in enumerate(row)) + " |")
    emit_json({"machine": machine(), "rows": [dict(zip(("comparison", "kiln", "peer", "ratio", "target", "seconds"),
                                                       row)) for row in table]}, RESULTS / "summary.json", echo=False)


if __name__ == "__main__":
    main()
