"""Peak memory of `kiln.data.prepare` on a large Parquet file: streamed in record batches, memory stays flat.

    python bench/parquet_memory.py                          # a >= 1 GB generated Parquet file, char vocab
    python bench/parquet_memory.py --size-mb 100 --tokenizer bpe
    python bench/parquet_memory.py --path big.parquet       # an existing file (its "text" column)

The generated file (in a temporary folder, deleted afterwards) has one document per row: 1-40 lines of words
drawn from tiny Shakespeare's vocabulary, an id column beside the text column, snappy compression (pyarrow's
default), row groups of --row-group rows; it is written until the *file* reaches --size-mb, so its text is
larger than that. prepare runs in a child process so that its peak RSS (VmHWM) is measured alone; the text
column's uncompressed size (the footer's total) is what reading the file at once would hold at the least.
Like bench/prepare_memory.py, which does the same for a plain text file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from prepare_memory import peak_rss_mb  # noqa: E402


def generate(path: Path, size_mb: float, row_group: int, seed: int = 0) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kiln.data.text import EMBEDDED

    words = np.array(sorted(set(EMBEDDED["kiln:tinyshakespeare"].read_text().split())))
    rng = np.random.default_rng(seed)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    target, rows, text_bytes = int(size_mb * 1e6), 0, 0
    with pq.ParquetWriter(str(path), schema) as w:
        while path.stat().st_size < target:
            n_lines = rng.integers(1, 41, row_group)
            lengths = rng.integers(4, 16, int(n_lines.sum()))
            picks = words[rng.integers(0, len(words), int(lengths.sum()))]
            ends = np.cumsum(lengths)
            lines = [" ".join(picks[a:b]) for a, b in zip(np.r_[0, ends[:-1]], ends)]
            cuts = np.cumsum(n_lines)
            docs = ["\n".join(lines[a:b]) for a, b in zip(np.r_[0, cuts[:-1]], cuts)]
            text_bytes += sum(len(d) for d in docs)  # ASCII words: characters == bytes
            w.write_table(pa.table({"id": np.arange(rows, rows + len(docs)), "text": docs}, schema=schema))
            rows += len(docs)
    return {"rows": rows, "text_mb": text_bytes / 1e6}


def child(args) -> None:
    from kiln.config import DataConfig
    from kiln.data import prepare

    base = peak_rss_mb()
    cfg = DataConfig(source=args.path, tokenizer=args.tokenizer, vocab_size=args.vocab)
    t = time.time()
    m = prepare(cfg, args.out, log=lambda s: print(s, file=sys.stderr, flush=True),
                tokenizer_sample_bytes=int(args.sample_mb * 1e6))
    print(json.dumps({"seconds": time.time() - t, "peak_rss_mb": peak_rss_mb(), "rss_after_import_mb": base,
                      "mb_per_second": m["mb_per_second"], "bytes_in": m["bytes_in"], "documents": m["documents"],
                      "tokens": m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", help="Parquet file to prepare (default: generate one in a temp dir)")
    ap.add_argument("--size-mb", type=float, default=1024, help="size of the generated file (MB on disk)")
    ap.add_argument("--row-group", type=int, default=20_000, help="rows per row group of the generated file")
    ap.add_argument("--tokenizer", default="char", help="char | bpe | wordpiece | tokenizer.json")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--sample-mb", type=float, default=50, help="text a bpe/wordpiece tokenizer is trained on (MB)")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="kiln-bench-", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        path = Path(args.path) if args.path else Path(tmp) / "corpus.parquet"
        gen = {}
        if not args.path:
            t = time.time()
            gen = generate(path, args.size_mb, args.row_group)
            print(f"generated {path.stat().st_size / 1e6:.0f} MB ({gen['rows']:,} rows, {gen['text_mb']:.0f} MB of "
                  f"text) in {time.time() - t:.0f}s", file=sys.stderr)
        meta = pq.ParquetFile(str(path)).metadata
        col = meta.schema.names.index("text")
        text_mb = sum(meta.row_group(i).column(col).total_uncompressed_size for i in range(meta.num_row_groups)) / 1e6
        cmd = [sys.executable, __file__, "--child", "--path", str(path), "--out", str(Path(tmp) / "prepared"),
               "--tokenizer", args.tokenizer, "--vocab", str(args.vocab), "--sample-mb", str(args.sample_mb)]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if r.returncode:
            sys.exit(r.returncode)
        s = json.loads(r.stdout.strip().splitlines()[-1])
        s.update(file_mb=round(path.stat().st_size / 1e6, 1), text_column_uncompressed_mb=round(text_mb, 1),
                 row_groups=meta.num_row_groups, rows=meta.num_rows, tokenizer=args.tokenizer,
                 command=" ".join(["python", "bench/parquet_memory.py", *sys.argv[1:]]), generated_text_mb=gen.get("text_mb"))
    from common import machine

    s["machine"] = machine()
    print(f"prepare {s['file_mb']:.0f} MB Parquet ({s['rows']:,} rows in {s['row_groups']} row groups, text column "
          f"{s['text_column_uncompressed_mb']:.0f} MB uncompressed), {args.tokenizer}: {s['tokens']:,} tokens in "
          f"{s['seconds']:.0f}s = {s['mb_per_second']:.2f} MB/s of file, peak RSS {s['peak_rss_mb']:.0f} MB (after "
          f"imports {s['rss_after_import_mb']:.0f} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2) + "\n")


if __name__ == "__main__":
    main()
