#!/usr/bin/env bash
# kiln's CUDA paths and GPU numbers in one call (CI has no GPU: run this by hand on a CUDA machine).
#
#   bash bench/gpu_check.sh                 # from the repo root; logs under $OUT (default bench/out/gpu)
#   SMOKE=1 bash bench/gpu_check.sh         # tiny sizes on the CPU: checks this script itself
#
# Stages, each under its own time limit, each log kept whole in $OUT/<stage>.log:
#   env         GPU, driver, torch/transformers versions
#   recipe      the default char-level recipe (precision auto -> bf16 on the GPU), then generate: greedy with and
#               without the KV cache (must be equal), sampling, beam search
#   mlm         the BERT-style MLM recipe for a few steps (head on the target rows only)
#   throughput  124M GPT-2 training step, kiln vs transformers' GPT2LMHeadModel, same data and loop,
#               bf16 autocast, eager and torch.compile; MFU against the measured matmul ceiling and the datasheet
#   ddp, fsdp   `torchrun -m kiln pretrain` of the 124M recipe on BPE shards (.gpu/books, made by this script's
#               caller: kiln data prepare), NCCL, DDP then FSDP2 (fully_shard), then FSDP2 with compile and
#               activation checkpointing; tokens/s and MFU from the run's metrics.csv
set -u
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
TORCHRUN=${TORCHRUN:-"$PY -m torch.distributed.run"}
W=${WORK:-/tmp/kiln-gpu}
rm -rf "$W"; mkdir -p "$W"
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; MODEL="--model.n_layer 2 --model.d_model 64 --model.n_head 2 --model.context_length 64"
  TP="--preset gpt-baby --batch 2 --context 64 --steps 2 --rounds 1"; EAGER="hf:fp32,kiln:fp32"; COMPILED="hf:fp32+compile,kiln:fp32+compile"
  STEPS=6; MB=2; ACC=2; RSTEPS=30
else
  DEV=cuda; MODEL="--model_preset gpt2 --model.vocab_size 50304 --model.context_length 1024"
  TP="--preset gpt2 --vocab 50304 --batch 12 --context 1024 --steps 10 --rounds 2 --peak-tflops 989"
  EAGER="hf:bf16,kiln:bf16,kiln:bf16-weights"; COMPILED="hf:bf16+compile,kiln:bf16+compile"
  STEPS=30; MB=16; ACC=4; RSTEPS=600
fi

LOGS="$W/logs"; mkdir -p "$LOGS"  # stage logs, packed into $OUT/logs.tar after each stage (few files come back)
summary="$OUT/summary.txt"; : > "$summary"
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "=== $name: $*" | tee -a "$summary"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "--- $name rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$summary"
  grep -v "^\s*$" "$LOGS/$name.log" | grep -iv "warn\|^  " | tail -n "${TAILN:-12}" | tee -a "$summary"
  tar -cf "$OUT/logs.tar" -C "$LOGS" .
}

stage env 60 bash -c "nvidia-smi -L 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null;
  $PY -c 'import torch, transformers, tokenizers, safetensors; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
  \"available\", torch.cuda.is_available(), \"| transformers\", transformers.__version__, \"| tokenizers\", tokenizers.__version__)'; nproc"

stage recipe 100 bash -c "$PY -m kiln pretrain --out $W/demo --train.device $DEV --train.max_steps $RSTEPS &&
  $PY -m kiln generate $W/demo --prompt ROMEO: --max-new-tokens 80 --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1 &&
  $PY -m kiln generate $W/demo --prompt ROMEO: --max-new-tokens 40 --num-beams 4 &&
  $PY - <<'EOF'
import torch, kiln
model, tok, _ = kiln.load('$W/demo', device='$DEV')
print('device', next(model.parameters()).device, next(model.parameters()).dtype)
ids = torch.tensor([tok.encode('ROMEO:').ids], device=next(model.parameters()).device)
a = model.generate(ids, max_new_tokens=60, temperature=0.0)
b = model.generate(ids, max_new_tokens=60, temperature=0.0, use_cache=False)
print('greedy with cache == without:', torch.equal(a, b))
assert torch.equal(a, b)
EOF"


stage throughput 120 $PY bench/throughput.py --device $DEV $TP --variants $EAGER

common="-m kiln pretrain --data.prepared .gpu/books $MODEL --train.device $DEV --train.max_steps $STEPS
  --train.batch_size $MB --train.grad_accum $ACC --train.warmup_steps 10 --train.lr 6e-4 --train.optimizer adamw
  --train.eval_every $STEPS --train.eval_batches 4 --train.log_every 5 --train.sample_tokens 0 --train.tensorboard false"
stage ddp 100 $TORCHRUN --standalone --nproc-per-node 1 $common --train.parallel ddp --out "$W/ddp"
stage fsdp 100 $TORCHRUN --standalone --nproc-per-node 1 $common --train.parallel fsdp --out "$W/fsdp"
stage throughput-compile 200 $PY bench/throughput.py --device $DEV $TP --variants $COMPILED
stage fsdp-compile-ac 150 $TORCHRUN --standalone --nproc-per-node 1 $common --train.parallel fsdp --train.compile true \
  --train.activation_checkpointing true --out "$W/fsdp-ac"

stage mlm 60 $PY -m kiln pretrain configs/bert-mlm.yaml --out "$W/mlm" --train.device $DEV --train.max_steps 200 \
  --train.eval_every 100 --train.log_every 50

# tokens/s of the three torchrun runs (median of the logged windows after the first), MFU as nanoGPT counts it
$PY - "$W" <<'EOF' | tee -a "$summary"
import csv, statistics, sys
from pathlib import Path
w = Path(sys.argv[1])
for name in ("ddp", "fsdp", "fsdp-ac"):
    f = w / name / "metrics.csv"
    if not f.is_file():
        print(f"{name}: no metrics.csv"); continue
    rows = [r for r in csv.DictReader(f.open()) if r["tokens_per_second"]]
    tps = statistics.median(float(r["tokens_per_second"]) for r in rows[1:] or rows)
    import yaml
    m = yaml.safe_load((w / name / "config.yaml").read_text())["model"]
    L, d, T, V = m["n_layer"], m["d_model"], m["context_length"], m["vocab_size"]
    n = 12 * L * d * d + V * d  # blocks + tied embedding (nanoGPT's count: no position table)
    flops_per_token = 6 * n + 12 * L * d * T  # nanoGPT's estimate_mfu (PaLM appendix B)
    val = [r["val_loss"] for r in csv.DictReader(f.open()) if r["val_loss"]]
    print(f"{name}: median {tps:,.0f} tokens/s, {tps * flops_per_token / 1e12:.0f} TFLOP/s = "
          f"{tps * flops_per_token / 989e12:.1%} of 989 TFLOP/s; loss {rows[0]['loss']} -> {rows[-1]['loss']}, "
          f"val {val[-1] if val else '-'}")
EOF
echo "logs: $OUT"
