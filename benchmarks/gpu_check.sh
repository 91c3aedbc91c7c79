#!/usr/bin/env bash
# Issue 17 on one GPU (H100/H200), through the real trainer, in under 8 minutes:
#   1. installs what is missing: torch first (pip's default CUDA build), then the project's dependencies and
#      flash-linear-attention (optional); never flash-attn (no wheel for current torch, hours to build);
#   2. kernel and attention parity on CUDA: benchmarks/check_cuda_paths.py (fla vs torch DeltaProduct kernel,
#      bf16 vs fp32 models, packed documents under flex_attention / varlen_attention vs the dense mask);
#   3. `seedlm train` for a ~1B dense model, a ~4B MoE (~1B active) and a ~1B DeltaProduct: bf16, ZeRO-1,
#      train.compile=true, packed documents of the embedded stdlib corpus with document masking;
#   4. a table of tokens/s and MFU from each run's metrics.jsonl, and the DeltaProduct kernel choice
#      (fla only after its parity check on the run's head shapes), in $OUT/gpu_check.md.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--steps N] [--peak-tflops X] [--attn IMPL]
#
# --dry-run prints the commands and runs none. Each training run is capped (RUN_TIMEOUT seconds) so the
# script always ends with a table; a run that did not finish says so there.
set -euo pipefail

DRY_RUN=0
OUT=benchmarks/results/gpu_check
STEPS=10
PEAK_TFLOPS=989          # dense bf16 peak of an H100/H200 SXM
ATTN=varlen_attention    # or flex_attention
RUN_TIMEOUT=${RUN_TIMEOUT:-130}
PY=${PYTHON:-python}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT=$2; shift ;;
        --steps) STEPS=$2; shift ;;
        --peak-tflops) PEAK_TFLOPS=$2; shift ;;
        --attn) ATTN=$2; shift ;;
        *) echo "unknown argument $1; use --dry-run, --out DIR, --steps N, --peak-tflops X, --attn IMPL" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the working tree's seedlm, installed or not

step() {  # step COMMAND: print it, then run it unless --dry-run
    echo "+ $1"
    if [ "$DRY_RUN" = 0 ]; then
        eval "$1"
    fi
}

# 1. install what is missing
step "$PY -c 'import torch; assert torch.cuda.is_available()' || $PY -m pip install torch"
step "$PY -c 'import deepspeed, transformers, sentencepiece' || $PY -m pip install -e ."
step "$PY -c 'import fla' || $PY -m pip install flash-linear-attention || echo 'fla not installed: DeltaProduct trains on the torch kernel'"
step "mkdir -p $OUT"
step "$PY -c 'import torch, importlib.metadata as m; print(torch.cuda.get_device_name(), \"torch\", torch.__version__, \"triton\", m.version(\"triton\"))' | tee $OUT/versions.txt"

# 2. parity on CUDA
step "$PY benchmarks/check_cuda_paths.py --skip throughput 2>&1 | tee $OUT/parity.md"

# 3. the trainer on three models, 2048-token rows of packed documents
COMMON="data.sources=[stdlib] data.seq_len=2048 data.micro_batch_size=8 data.num_workers=2 \
tokenizer.vocab_size=16384 tokenizer.max_chars=5000000 \
train.dtype=bf16 zero_stage=1 train.compile=true train.attn_implementation=$ATTN \
max_steps=$STEPS train.warmup_steps=2 train.log_interval=1 train.eval_interval=0 train.save_interval=100000 \
train.peak_tflops=$PEAK_TFLOPS train.progress_bar=false train.tensorboard=false"
TOKENIZER="tokenizer.path=$OUT/dense/tokenizer"  # the first run trains it; the others reuse it
MODEL_COMMON="model_overrides.vocab_size=16384 model_overrides.hidden_size=2048 model_overrides.head_dim=128 model_overrides.max_position_embeddings=2048"

train() {  # train NAME PRESET OVERRIDES...
    local name=$1 preset=$2
    shift 2
    step "timeout $RUN_TIMEOUT $PY -m seedlm.launch.cli train $preset $COMMON output_dir=$OUT/$name $* \
2>&1 | tee $OUT/$name.log | grep -E 'DeltaProduct kernel|Error|error:' || true"
}
train dense gated_moe_tiny $MODEL_COMMON model_overrides.num_hidden_layers=16 model_overrides.num_attention_heads=16 \
    model_overrides.num_key_value_heads=8 model_overrides.num_experts=0 model_overrides.intermediate_size=6144
train moe gated_moe_tiny $TOKENIZER $MODEL_COMMON model_overrides.num_hidden_layers=12 model_overrides.num_attention_heads=32 \
    model_overrides.num_key_value_heads=4 model_overrides.num_experts=64 model_overrides.num_experts_per_tok=8 \
    model_overrides.moe_intermediate_size=768 model_overrides.shared_expert_intermediate_size=0
train deltaproduct deltaproduct_tiny $TOKENIZER $MODEL_COMMON model_overrides.num_hidden_layers=16 model_overrides.num_heads=16 \
    model_overrides.num_householder=2 model_overrides.intermediate_size=5632

# 4. the table
step "$PY benchmarks/gpu_check_summary.py $OUT dense moe deltaproduct | tee $OUT/gpu_check.md"
