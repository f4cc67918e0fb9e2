#!/usr/bin/env bash
# The GPU check in one command (under 10 minutes on an H100/H200), from the repository root:
#
#     bash benchmarks/gpu_suite.sh            # results under $OUT (or benchmarks/gpu_suite_out)
#
# 1. the loss-kernel table (benchmarks/loss_kernel.py: naive, chunked, Pallas/Triton; bf16),
# 2. the ~1B model's step time and MFU at seq 2048 in bfloat16 (benchmarks/train_step.py on the
#    1b preset's shape with cuDNN attention; the sample corpus's 4096-piece tokenizer stands
#    in for a 32k one, so the output projection is 8x smaller than the preset's),
# 3. the packed-attention test: fails if any attention backend there (xla, cudnn, splash in
#    interpret mode) lets a token attend across segment_ids; and the kernels' correctness tests,
# 4. the inference engine: decode tokens/s of the 1b preset's shape (random parameters, bf16) at
#    batch 1, 8 and 64 (benchmarks/inference.py --device-decode).
#
# SMOKE=1 JAX_PLATFORMS=cpu runs the same steps at toy sizes (a check of the script itself).
# Needs JAX with CUDA. Packages missing there (grain, tensorboardX, portpicker, ...) can be
# put as wheels in .whl/ (see the device README); they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/gpu_suite_out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
loss_args=(--check)
decode_args=(--device-decode --batches 1,8,64 --new-tokens 128 --rounds 3)  # context 160 (prompt + new)
shape=(--set trainer.seq_len=2048 --set trainer.batch_size=8 --set model.attention=cudnn)
if [ "${SMOKE:-0}" = 1 ]; then
  loss_args=(--shapes 256,64,1024 --impls naive,chunked --iters 1)
  shape=(--set trainer.seq_len=128 --set trainer.batch_size=2 --set model.attention=xla
         --set model.d_model=64 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=4
         --set model.d_ff=128 --set model.max_seq_len=128)
  decode_args=(--device-decode --smoke --batches 1,8 --new-tokens 16 --rounds 1)
fi
python3 -c "import jax; d = jax.devices()[0]; print('device:', d.device_kind, 'jax', jax.__version__)" | tee "$out/device.txt"

echo "== 1. loss kernel" | tee "$out/summary.txt"
timeout 240 python3 benchmarks/loss_kernel.py "${loss_args[@]}" 2>&1 | tee "$out/loss_kernel.txt"

echo "== 2. ~1B model, seq 2048, bf16" | tee -a "$out/summary.txt"
timeout 240 python3 benchmarks/train_step.py --config configs/1b.yaml --steps 20 --rounds 1 \
  --set data.tokenizer=tokenizer/sample.model --set model.vocab_size=4096 "${shape[@]}" \
  --set mesh.fsdp=1 --set mesh.data=-1 --json "$out/train_step.json" 2>&1 | tee "$out/train_step.txt"
grep -E "MFU|full loop|bare" "$out/train_step.txt" | tee -a "$out/summary.txt" || true

echo "== 3. packed attention and kernel correctness" | tee -a "$out/summary.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/layers/test_attention_backends.py \
  tests/kernels/test_cross_entropy.py 2>&1 | tee "$out/tests.txt"
tail -n 1 "$out/tests.txt" | tee -a "$out/summary.txt"

echo "== 4. inference engine: decode tokens/s, 1b shape" | tee -a "$out/summary.txt"
timeout 240 python3 benchmarks/inference.py "${decode_args[@]}" --json "$out/inference.json" 2>&1 \
  | tee "$out/inference.txt"
grep -E "^\| [0-9]+ \|" "$out/inference.txt" | tee -a "$out/summary.txt" || true
