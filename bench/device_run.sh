#!/usr/bin/env bash
# One device call: install carried wheels, check SP=N == SP=1 on the GPUs, run the timed variants, print the table.
#   bash bench/device_run.sh PHASE      (PHASE: a = checks + 1 GPU + SP=2 + VAE rank; b = memory cap, backends)
#   DRY=1 bash bench/device_run.sh a    (the same steps on the CPU with the tiny config, to catch mistakes)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PHASE=${1:-a}
OUTDIR=${OUT:-/tmp/bench_out}; mkdir -p "$OUTDIR"
RES=$OUTDIR/results.jsonl; LOG=$OUTDIR/log.txt
if [ -d .whl ] && [ -z "${DRY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
SRC=${SRC:-.}; cd "$SRC"
PY=${PY:-python3}; TR="$PY -m torch.distributed.run --nproc-per-node 2"
FULL=configs/liveavatar_14b.yaml
if [ -n "${DRY:-}" ]; then
  FULL=configs/tiny.yaml; DEV="--device cpu"; CHK="--set runtime.device cpu"; CLIPS=2; SHORT=2; LONG=3; FLAT=3
else
  DEV=""; CHK="--set runtime.device cuda"; CLIPS=12; SHORT=4; LONG=200; FLAT=1000
fi
step() {  # step NAME TIMEOUT_S CMD...: full output to the log, the lines that matter to the console
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  local one=/tmp/step_$name.log  # only two files go back in $OUT: the whole log and the results
  timeout "$limit" "$@" >"$one" 2>&1; local rc=$?
  { echo "=== $name"; cat "$one"; } >>"$LOG"
  grep -E "^(CHECK|RESULT)|Error|error:|out of memory|Traceback" "$one" | grep -v "^RESULT" | tail -5
  sed -n '/^PROFILE/,/^Self CUDA time total/p' "$one" | cut -c1-200
  grep -h "^RESULT" "$one" | sed 's/^RESULT //' >>"$RES"
  [ $rc -ne 0 ] && echo "    $name exited $rc"
  return 0
}
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader 2>/dev/null
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'gpus', torch.cuda.device_count())"

if [ "$PHASE" = a ]; then
  step check_tiny 120 $TR bench/check_sp.py $CHK --clips 2
  step check_14b_dims_sharded 180 $TR bench/check_sp.py --config $FULL $CHK --set runtime.dtype bfloat16 \
       --set model.dit.num_layers 4 --set video.size 256*256 --set video.infer_frames 24 --clips 2 --tolerance 5e-2 \
       --shard_weights
  # Both GPUs busy at once: full size on one GPU each way, the long flatness runs at reduced cost.
  ( CUDA_VISIBLE_DEVICES=1 step flat_200 300 $PY bench/gpu_bench.py --config $FULL $DEV --clips $LONG \
       --sample_steps 1 --set model.dit.num_layers 4 --vae_mode stream --label "flatness-200 (4 layers, 1 step)" ) &
  ( CUDA_VISIBLE_DEVICES=0 step gpu1 330 $PY bench/gpu_bench.py --config $FULL $DEV --clips $CLIPS \
       --vae_mode inline,stream --profile --label "14B 1 GPU"
    CUDA_VISIBLE_DEVICES=0 step flat_1000 200 $PY bench/gpu_bench.py --config $FULL $DEV --clips $FLAT \
       --sample_steps 1 --set model.dit.num_layers 4 --set video.size 256*256 --set video.infer_frames 12 \
       --vae_mode stream --label "flatness-1000 (256x256, 12 frames, 4 layers, 1 step)" ) &
  wait
  step sp2 240 $TR bench/gpu_bench.py --config $FULL $DEV --clips $CLIPS --vae_mode inline,stream --label "14B SP=2"
fi
if [ "$PHASE" = b ]; then
  # GPU 1: memory flatness (issue 2: 200 clips at 704x384; issue 4: 1000 clips at a reduced size).
  ( CUDA_VISIBLE_DEVICES=1 step flat_200 150 $PY bench/gpu_bench.py --config $FULL $DEV --clips $LONG \
       --sample_steps 1 --set model.dit.num_layers 4 --set video.infer_frames 12 --vae_mode inline \
       --label "flatness-200 (704x384, 12-frame clips, 4 layers, 1 step)"
    CUDA_VISIBLE_DEVICES=1 step flat_1000 120 $PY bench/gpu_bench.py --config $FULL $DEV --clips $FLAT \
       --sample_steps 1 --set model.dit.num_layers 4 --set video.size 256*256 --set video.infer_frames 12 \
       --vae_mode inline --label "flatness-1000 (256x256, 12-frame clips, 4 layers, 1 step)" ) &
  # GPU 0: one GPU at full size; decode inline, then on a decode thread with its own stream.
  CUDA_VISIBLE_DEVICES=0 step gpu1_decode_thread 150 $PY bench/gpu_bench.py --config $FULL $DEV --clips $SHORT \
       --vae_mode inline,stream --label "14B 1 GPU"
  wait
  step sp2_sharded 110 $TR bench/gpu_bench.py --config $FULL $DEV --clips $SHORT --vae_mode inline,stream \
       --shard_weights --label "14B SP=2 per-layer sharded weights"
fi
echo "=== table"
$PY bench/table.py "$RES"
