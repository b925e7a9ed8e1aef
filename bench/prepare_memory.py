"""Peak memory and throughput of `kiln.data.prepare` on a large text file.

    python bench/prepare_memory.py                        # 1 GB synthetic text, BPE vocab 4096
    python bench/prepare_memory.py --size-mb 100 --tokenizer char
    python bench/prepare_memory.py --path big.txt         # an existing file

The synthetic file is random lines of words drawn from tiny Shakespeare's vocabulary. The BPE
tokenizer is trained on the first --sample-mb MB only (default 50); the whole file is then encoded.
prepare runs in a child process so that its peak RSS (VmHWM, else ru_maxrss) is measured alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def generate(path: Path, size_mb: float, seed: int = 0) -> None:
    """Write about `size_mb` MB of random Shakespeare-word lines, 8 MB at a time."""
    from kiln.data.text import EMBEDDED

    words = np.array(sorted(set(EMBEDDED["kiln:tinyshakespeare"].read_text().split())))
    rng = np.random.default_rng(seed)
    target, written = int(size_mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            picks = words[rng.integers(0, len(words), 1_500_000)]
            ends = np.cumsum(rng.integers(4, 16, 200_000))
            ends = ends[ends < len(picks)]
            lines = [" ".join(picks[a:b]) for a, b in zip(np.r_[0, ends[:-1]], ends)]
            block = "\n".join(lines) + "\n"
            block = block[: target - written] if written + len(block) > target else block
            f.write(block)
            written += len(block.encode("utf-8"))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (Linux; ru_maxrss would include the parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    from kiln.config import DataConfig
    from kiln.data import prepare

    base = peak_rss_mb()
    cfg = DataConfig(source=args.path, tokenizer=args.tokenizer, vocab_size=args.vocab)
    t = time.time()
    m = prepare(cfg, args.out, log=lambda s: print(s, file=sys.stderr, flush=True),
                tokenizer_sample_bytes=int(args.sample_mb * 1e6))
    peak = peak_rss_mb()
    print(json.dumps({"seconds": time.time() - t, "peak_rss_mb": peak, "rss_after_import_mb": base,
                      "mb_per_second": m["mb_per_second"], "bytes_in": m["bytes_in"],
                      "tokens": m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", help="text file to prepare (default: generate one in a temp dir)")
    ap.add_argument("--size-mb", type=float, default=1024, help="size of the generated file")
    ap.add_argument("--tokenizer", default="bpe", help="bpe | char | wordpiece | tokenizer.json")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--sample-mb", type=float, default=50, help="text the tokenizer is trained on (MB)")
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        path = Path(args.path) if args.path else Path(tmp) / "corpus.txt"
        if not args.path:
            t = time.time()
            generate(path, args.size_mb)
            print(f"generated {path.stat().st_size / 1e6:.0f} MB in {time.time() - t:.0f}s", file=sys.stderr)
        cmd = [sys.executable, __file__, "--child", "--path", str(path), "--out", str(Path(tmp) / "prepared"),
               "--tokenizer", args.tokenizer, "--vocab", str(args.vocab), "--sample-mb", str(args.sample_mb)]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if r.returncode:
            sys.exit(r.returncode)
        s = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"prepare {s['bytes_in'] / 1e6:.0f} MB {args.tokenizer}"
          f"{'' if args.tokenizer == 'char' else f' vocab {args.vocab} (tokenizer trained on first {args.sample_mb:g} MB)'}: "
          f"{s['tokens']:,} tokens in {s['seconds']:.0f}s = {s['mb_per_second']:.2f} MB/s, "
          f"peak RSS {s['peak_rss_mb']:.0f} MB (after imports {s['rss_after_import_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
