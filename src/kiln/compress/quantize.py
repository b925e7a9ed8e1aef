"""`kiln quantize`: a run's weights as int8 (kiln.model.int8) in a new run folder, with the size / val loss /
decoding speed trade-off (kiln.compress.report)."""

from __future__ import annotations

from kiln.model.int8 import METHOD, Int8Embedding, Int8Linear, is_quantized, quantize_model  # noqa: F401


def quantize_run(run_dir, out_dir, which: str = "latest", log=print) -> dict:
    """Quantize a kiln run into a new run folder `out_dir` and report the trade-off (kiln.compress.report)."""
    import copy
    import shutil
    from pathlib import Path

    from kiln.compress.report import compare, new_run_folder, source_checkpoint
    from kiln.errors import KilnError
    from kiln.run.checkpoint import save_checkpoint

    ckpt, meta, model, cfg = source_checkpoint(run_dir, out_dir, which)
    if meta.get("quantization"):
        raise KilnError(f"{ckpt} is already quantized")
    qmodel = quantize_model(copy.deepcopy(model))
    out_dir = new_run_folder(out_dir, METHOD)
    for name in ("config.yaml", "tokenizer.json"):
        if (Path(run_dir) / name).is_file():
            shutil.copyfile(Path(run_dir) / name, out_dir / name)
    saved = save_checkpoint(out_dir, qmodel, int(meta.get("step", 0)), meta={"quantization": METHOD, "source": str(ckpt)})
    return compare(f"quantized {ckpt} -> {out_dir} ({METHOD})", {"method": METHOD, "source": str(ckpt)}, cfg,
                   run_dir, model, qmodel, ckpt, saved, out_dir, log)
