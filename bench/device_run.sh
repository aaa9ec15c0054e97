#!/usr/bin/env bash
# One device call: install carried wheels, check SP=N == SP=1 on the GPUs, run the timed variants, print the table.
#   bash bench/device_run.sh PHASE [--set KEY VALUE ...]
#     PHASE a = checks + 1 GPU + SP=2 + VAE rank; b = memory cap, backends (2 GPUs);
#     c = 4 GPUs (nvidia-h200-x4), under 560 s: 1/2/4-GPU Ulysses (kv_update clean_pass vs last_step,
#         runtime.compile off vs on), tpp on 4 GPUs (4 steps), 22 GB cap with sharded weights, 1000-clip flatness.
#     e = one GPU: KV modes eager and compiled, attention backends, fused QKV, VAE options, flatness.
#     d = phase c on 2 GPUs (nvidia-h200-x2) when 4 are not lent: 1 GPU eager/compiled, SP=2, tpp 2 steps, flatness.
#     f = one GPU: runtime.fp8 (float8 weights, float8 GEMMs, compiled) against bf16; g = one GPU: compile
#         (bf16, fp8) in the stream bench and the 1000-clip flatness run; h = 2 GPUs: fp8 with SP=2, fp8 + sharded weights
#         under the 22 GB cap, tpp in fp8; i = 2 GPUs: SP=2 fp8 profile;
#         j = 2 GPUs: fp8 + sharded weights under the 22 GB cap; k = 2 GPUs: the engine path under the cap;
#         l = phase j compiled; m = phase k compiled, as the README's 24 GB recipe runs;
#     n = one GPU: the reference scheme (per_step, fps 25) through the engine path (bench/engine_gpu.py);
#     o = one GPU, ~30 s: the float8 KV cache's Triton kernels against eager (bytes equal, ms, GB/s).
#     p = one GPU: phase o, then LiveAvatar's per-tensor float8 (runtime.fp8 tensor) through the engine path under the
#         reference scheme, KV windows in bf16 and in float8 with the Triton kernels (beside phase n's gemm rows).
#     q = one GPU: the float8 attention kernel (runtime.attention_backend fp8) against SDPA at the 14B's shape per launch
#         configuration (errors, ms), then, if one passes and beats widening + SDPA, the engine path under the
#         reference scheme with float8 KV windows with and without it (that configuration, a profile of one clip).
#     Any --set after the phase goes to every timed row (e.g. --set runtime.attention_backend cudnn).
#   DRY=1 bash bench/device_run.sh c    (the same steps on the CPU with the tiny config and gloo, to catch mistakes)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PHASE=${1:-a}; shift || true
EXTRA=("$@")
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
  FULL=configs/tiny.yaml; DEV="--device cpu --set video.size 64*64"; CHK="--set runtime.device cpu"
  CLIPS=2; SHORT=2; LONG=3; FLAT=12; FLATSIZE=64*64; N4=2; export OMP_NUM_THREADS=1
else
  DEV=""; CHK="--set runtime.device cuda"; CLIPS=12; SHORT=4; LONG=200; FLAT=1000; FLATSIZE=256*256; N4=4
fi
TR4="$PY -m torch.distributed.run --nproc-per-node $N4"
B="bench/gpu_bench.py --config $FULL $DEV ${EXTRA[*]:-}"  # the stream bench; --set after the phase reaches it
COMPILE=true; [ -n "${DRY:-}" ] && COMPILE=false  # inductor on 2 CPU cores takes minutes
SPEED="bench/dit_speed.py"; [ -n "${DRY:-}" ] && SPEED="bench/dit_speed.py --dry"
step() {  # step NAME TIMEOUT_S CMD...: full output to the log, the lines that matter to the console
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  local one=/tmp/step_$name.log  # only two files go back in $OUT: the whole log and the results
  timeout "$limit" "$@" >"$one" 2>&1; local rc=$?
  { echo "=== $name"; cat "$one"; } >>"$LOG"
  grep -E "^(CHECK|RESULT|SPEED|ENGINE)|Error|error:|out of memory|Traceback" "$one" | grep -v "^RESULT" | tail -5
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
if [ "$PHASE" = c ]; then
  TPP="--set parallel.mode tpp --set sampler.kv_update per_step --set sampler.sample_steps $N4"
  # Budget (worst case, every step at its timeout): 200 + 45 + 100 + 90 + 100 s + install = under 560 s.
  # Stage 1 (at most 200 s), each GPU busy: 1 GPU eager and compiled, 2 GPUs, then the 1000-clip flatness run.
  ( CUDA_VISIBLE_DEVICES=0 step c_gpu1 200 $PY $B --clips $SHORT --kv_update clean_pass,last_step --vae_mode stream \
       --label "14B 1 GPU" ) &
  ( CUDA_VISIBLE_DEVICES=1 step c_gpu1_compile 200 $PY $B --clips 3 --kv_update last_step --vae_mode stream \
       --set runtime.compile $COMPILE --label "14B 1 GPU compiled" ) &
  ( CUDA_VISIBLE_DEVICES=2,3 step c_sp2 110 $TR $B --clips $SHORT --kv_update clean_pass,last_step --vae_mode stream \
       --label "14B Ulysses SP=2"
    CUDA_VISIBLE_DEVICES=2 step c_flat_1000 90 $PY $B --clips $FLAT --sample_steps 1 --set model.dit.num_layers 4 \
       --set video.size $FLATSIZE --set video.infer_frames 12 --kv_update last_step --vae_mode inline \
       --label "flatness-1000 (256x256, 12-frame clips, 4 layers, 1 step)" ) &
  wait
  # Stage 2 (at most 335 s), all 4 GPUs per row: tpp == per_step on one process (tiny, float32), then timings.
  step c_check_tpp 45 $TR4 bench/check_sp.py $CHK $TPP --set video.infer_frames 24 --clips 3
  step c_sp4 100 $TR4 $B --clips $SHORT --kv_update clean_pass,last_step --vae_mode stream --label "14B Ulysses SP=4"
  step c_tpp4 90 $TR4 $B $TPP --clips 6 --vae_mode stream --label "14B tpp (one step per GPU)"
  step c_cap22 100 $TR4 $B --clips 3 --kv_update last_step --vae_mode inline --shard_weights --mem_cap_gb 22 \
       --label "14B SP=4 sharded weights, 22 GB cap"
fi
if [ "$PHASE" = d ]; then
  # The same measurements as phase c on a 2-GPU machine (nvidia-h200-x2), for when 4 GPUs are not lent.
  TPP2="--set parallel.mode tpp --set sampler.kv_update per_step --set sampler.sample_steps 2"
  # Stage 1 (at most 230 s): GPU 0 eager in both KV modes; GPU 1 compiled, then the 1000-clip flatness run.
  ( CUDA_VISIBLE_DEVICES=0 step d_gpu1 170 $PY $B --clips $SHORT --kv_update clean_pass,last_step --vae_mode stream \
       --label "14B 1 GPU" ) &
  ( CUDA_VISIBLE_DEVICES=1 step d_gpu1_compile 150 $PY $B --clips 3 --kv_update clean_pass,last_step \
       --vae_mode stream --set runtime.compile $COMPILE --label "14B 1 GPU compiled"
    CUDA_VISIBLE_DEVICES=1 step d_flat_1000 75 $PY $B --clips $FLAT --sample_steps 1 --set model.dit.num_layers 4 \
       --set video.size $FLATSIZE --set video.infer_frames 12 --kv_update last_step --vae_mode inline \
       --label "flatness-1000 (256x256, 12-frame clips, 4 layers, 1 step)" ) &
  wait
  # Stage 2 (at most 300 s), both GPUs per row.
  step d_sp2 110 $TR $B --clips $SHORT --kv_update clean_pass,last_step --vae_mode stream --label "14B Ulysses SP=2"
  step d_sp2_compile 110 $TR $B --clips 3 --kv_update last_step --vae_mode stream --set runtime.compile $COMPILE \
       --label "14B Ulysses SP=2 compiled"
  step d_tpp2 75 $TR $B $TPP2 --clips 6 --vae_mode stream --label "14B tpp 2 steps (one step per GPU)"
fi
if [ "$PHASE" = e ]; then
  # One GPU (nvidia-h200 / nvidia-h100-x1), one change at a time: KV modes eager, then compiled; attention
  # backends, fused QKV and VAE decode options; the 1000-clip flatness run. Under 560 s in all.
  step e_gpu1 150 $PY $B --clips $SHORT --kv_update clean_pass,last_step --vae_mode stream --label "14B 1 GPU"
  step e_gpu1_compile 190 $PY $B --clips 3 --kv_update clean_pass,last_step --vae_mode stream \
       --set runtime.compile $COMPILE --label "14B 1 GPU compiled"
  step e_options 130 $PY $SPEED --variants eager,cudnn,flash,fuse_qkv --vae --clips 1
  step e_flat_1000 70 $PY $B --clips $FLAT --sample_steps 1 --set model.dit.num_layers 4 \
       --set video.size $FLATSIZE --set video.infer_frames 12 --kv_update last_step --vae_mode inline \
       --label "flatness-1000 (256x256, 12-frame clips, 4 layers, 1 step)"
  [ -f "$OUTDIR/dit_speed.jsonl" ] && cat "$OUTDIR/dit_speed.jsonl"
fi
if [ "$PHASE" = f ]; then
  # One GPU: float8 linear layers (runtime.fp8) one change at a time against bf16, then the whole stream.
  step f_options 250 $PY $SPEED --variants eager,fp8_weights,fp8_gemm,fp8_gemm_compile --clips 2
  step f_gpu1_fp8 130 $PY $B --clips 3 --kv_update last_step --vae_mode stream --set runtime.fp8 gemm \
       --label "14B 1 GPU fp8 gemm"
  step f_gpu1_fp8_compile 170 $PY $B --clips 3 --kv_update last_step --vae_mode stream --set runtime.fp8 gemm \
       --set runtime.compile $COMPILE --label "14B 1 GPU fp8 gemm compiled"
  [ -f "$OUTDIR/dit_speed.jsonl" ] && cat "$OUTDIR/dit_speed.jsonl"
fi
if [ "$PHASE" = g ]; then
  # One GPU: torch.compile measured for real (bf16 and fp8; the stream bench's FLOP count used to leave the
  # compiled blocks eager), then the 1000-clip flatness run at reduced cost.
  step g_options 200 $PY $SPEED --variants eager,compile,fp8_gemm,fp8_gemm_compile --clips 2
  step g_gpu1_compile 110 $PY $B --clips 3 --kv_update last_step --vae_mode stream --set runtime.compile $COMPILE \
       --label "14B 1 GPU compiled"
  step g_gpu1_fp8_compile 110 $PY $B --clips 3 --kv_update last_step --vae_mode stream --set runtime.fp8 gemm \
       --set runtime.compile $COMPILE --label "14B 1 GPU fp8 gemm compiled"
  step g_flat_1000 250 $PY $B --clips $FLAT --sample_steps 1 --set model.dit.num_layers 4 \
       --set video.size $FLATSIZE --set video.infer_frames 12 --kv_update last_step --vae_mode inline \
       --label "flatness-1000 (256x256, 12-frame clips, 4 layers, 1 step)"
  [ -f "$OUTDIR/dit_speed.jsonl" ] && cat "$OUTDIR/dit_speed.jsonl"
fi
if [ "$PHASE" = k ] || [ "$PHASE" = m ]; then
  # Two GPUs: the server's own model path (ModelEngine + follower, warm-up included) with the 24 GB-card
  # settings: float8, per-layer sharded weights, 22 GB cap; k with eager blocks and one warm-up clip, m as the
  # README's 24 GB recipe runs it (the preset's compiled blocks, two warm-up clips).
  E="bench/engine_group.py --config $FULL --random_weights"
  [ -n "${DRY:-}" ] && E="bench/engine_group.py --config configs/tiny.yaml --set video.size 64*64"
  # random weights: byte tokenizer (no tokenizer files here) and 2 of umT5's 24 layers (it runs on the CPU,
  # so this shortens start-up, not GPU memory)
  CAP=(--set parallel.shard_weights true --set runtime.fp8 gemm --set runtime.text_encoder_device cpu
       --set model.text_encoder.tokenizer bytes --set model.text_encoder.num_layers 2 --mem_cap_gb 22)
  if [ "$PHASE" = k ]; then
    NAME=k_engine_sharded_fp8_cap
    step $NAME 170 $TR $E "${CAP[@]}" --set runtime.compile false --set runtime.warmup_clips 1 --clips 3
  else
    NAME=m_engine_sharded_fp8_cap_compiled
    step $NAME 280 $TR $E "${CAP[@]}" --set runtime.compile $COMPILE --set runtime.warmup_clips 2 --clips 4
  fi
  grep -h "^ENGINE" /tmp/step_$NAME.log
fi
if [ "$PHASE" = j ]; then
  # Two GPUs: float8 + per-layer sharded weights under the 22 GB cap, eager blocks (compiled blocks under
  # FSDP recompile per layer), the smaller KV window only if the default does not fit.
  F="--set runtime.fp8 gemm"; CAP="--mem_cap_gb 22"; [ -n "${DRY:-}" ] && CAP=""
  step j_sp2_fp8_sharded_cap 150 $TR $B --clips 3 --kv_update last_step --vae_mode inline $F \
       --shard_weights $CAP --label "14B SP=2 fp8 gemm, sharded weights, 22 GB cap"
  if ! grep -q "22 GB cap" "$RES" 2>/dev/null; then
    step j_sp2_fp8_sharded_cap_kv3 120 $TR $B --clips 3 --kv_update last_step --vae_mode inline $F \
         --shard_weights $CAP --set model.dit.kv_cache_blocks 3 \
         --label "14B SP=2 fp8 gemm, sharded weights, KV window 2 blocks, 22 GB cap"
  fi
fi
if [ "$PHASE" = l ]; then
  # Two GPUs: phase j's row with compiled blocks (the per-layer recompiles under sharding are fixed).
  CAP="--mem_cap_gb 22"; [ -n "${DRY:-}" ] && CAP=""
  step l_sp2_fp8_sharded_cap_compile 170 $TR $B --clips 3 --kv_update last_step --vae_mode inline \
       --set runtime.fp8 gemm --set runtime.compile $COMPILE --shard_weights $CAP \
       --label "14B SP=2 fp8 gemm compiled, sharded weights, 22 GB cap"
fi
if [ "$PHASE" = i ]; then
  # Two GPUs: a profile of SP=2 float8 compiled (where the time goes at SP=2).
  # Every rank runs the profiled clip (rank 0 alone used to, and its collectives then waited for good).
  step i_sp2_fp8_profile 330 $TR $B --clips 2 --kv_update last_step --vae_mode inline \
       --set runtime.compile $COMPILE --set runtime.fp8 gemm --profile --label "14B SP=2 fp8 gemm compiled, profiled"
fi
if [ "$PHASE" = h ]; then
  # Two GPUs (nvidia-h200-x2), compiled blocks: Ulysses SP=2 in bf16 and in float8; float8 + per-layer
  # sharding under a 22 GB cap (the 24 GB-card case; a smaller KV window if the default does not fit);
  # tpp in float8 at 2 steps.
  C="--set runtime.compile $COMPILE"; F="--set runtime.fp8 gemm"
  CAP="--mem_cap_gb 22"; [ -n "${DRY:-}" ] && CAP=""
  step h_sp2_compile 120 $TR $B --clips 3 --kv_update last_step --vae_mode stream $C --label "14B SP=2 compiled"
  step h_sp2_fp8 110 $TR $B --clips 3 --kv_update last_step --vae_mode stream $C $F \
       --label "14B SP=2 fp8 gemm compiled"
  step h_sp2_fp8_sharded_cap 150 $TR $B --clips 3 --kv_update last_step --vae_mode inline $C $F \
       --shard_weights $CAP --label "14B SP=2 fp8 gemm compiled, sharded weights, 22 GB cap"
  if ! grep -q "22 GB cap" "$RES" 2>/dev/null; then
    step h_sp2_fp8_sharded_cap_kv3 120 $TR $B --clips 3 --kv_update last_step --vae_mode inline $C $F \
         --shard_weights $CAP --set model.dit.kv_cache_blocks 3 \
         --label "14B SP=2 fp8 gemm compiled, sharded weights, KV window 2 blocks, 22 GB cap"
  fi
  step h_tpp_fp8 130 $TR $B --clips 4 --vae_mode stream $C $F --set parallel.mode tpp \
       --set sampler.kv_update per_step --set sampler.sample_steps 2 --label "14B tpp 2 steps fp8 gemm compiled"
fi
if [ "$PHASE" = n ] || [ "$PHASE" = o ] || [ "$PHASE" = p ]; then
  # The float8 KV cache's one-pass Triton kernels against eager PyTorch at the 14B's shapes (o: this alone, ~30 s).
  K=($PY bench/kv_cache_kernels.py); [ -n "${DRY:-}" ] && K=(env TRITON_INTERPRET=1 $PY bench/kv_cache_kernels.py --dry)
  step o_kv_cache_kernels 120 "${K[@]}"
  sed -n '/^packing equal/,$p' /tmp/step_o_kv_cache_kernels.log
fi
if [ "$PHASE" = n ] || [ "$PHASE" = p ]; then
  # The engine bench on the full preset (random weights, a small prompt encoder on the CPU), and the decode as
  # before the preset's chunk-3 default (VAE1), so the VAE variants measure that change.
  E="bench/engine_gpu.py --config $FULL --random_weights"
  [ -n "${DRY:-}" ] && E="bench/engine_gpu.py --dry"
  TXT=(--set runtime.text_encoder_device cpu --set model.text_encoder.tokenizer bytes
       --set model.text_encoder.num_layers 2)
  VAE3="runtime.vae_decode_chunk=3,runtime.vae_channels_last=true,runtime.cudnn_benchmark=true"
  VAE1=(--set runtime.vae_decode_chunk 1 --set runtime.vae_channels_last false --set runtime.cudnn_benchmark false)
fi
if [ "$PHASE" = n ]; then
  # One GPU, the reference scheme (kv_update per_step) at fps 25 through the server's engine path, float8 GEMMs,
  # compiled blocks, one load: per_step with the KV windows in bf16 (its FLOPs and a profile of one clip split
  # into GEMMs, attention, elementwise, copies, audio, VAE, idle), then in float8, then float8 + the VAE's
  # chunk-3 channels-last decode, then last_step and clean_pass beside them; the bytes of one KV window.
  step n_engine_reference_scheme ${N_LIMIT:-520} $PY $E "${TXT[@]}" "${VAE1[@]}" --set video.fps 25 \
       --set runtime.fp8 gemm --set runtime.compile $COMPILE --warmup 1 --clips 3 --window_bytes --profile per_step \
       --flops per_step \
       --variant per_step sampler.kv_update=per_step \
       --variant per_step_kv8 sampler.kv_update=per_step,runtime.kv_cache_dtype=float8 \
       --variant per_step_kv8_vae3cl "sampler.kv_update=per_step,runtime.kv_cache_dtype=float8,$VAE3" \
       --variant last_step "sampler.kv_update=last_step,$VAE3" --variant clean_pass "sampler.kv_update=clean_pass,$VAE3"
  grep -h "^WINDOW\|^LOAD" /tmp/step_n_engine_reference_scheme.log
  sed -n '/^| variant/,$p' /tmp/step_n_engine_reference_scheme.log
fi
if [ "$PHASE" = p ]; then
  # Phase n's first and third rows with runtime.fp8 tensor instead of gemm (a float8 mode is fixed per load).
  step p_engine_fp8_tensor ${P_LIMIT:-330} $PY $E "${TXT[@]}" "${VAE1[@]}" --set video.fps 25 \
       --set runtime.fp8 tensor --set runtime.compile $COMPILE --warmup 1 --clips 3 \
       --variant per_step_tensor sampler.kv_update=per_step \
       --variant per_step_tensor_kv8_vae3cl "sampler.kv_update=per_step,runtime.kv_cache_dtype=float8,$VAE3"
  grep -h "^LOAD" /tmp/step_p_engine_fp8_tensor.log
  sed -n '/^| variant/,$p' /tmp/step_p_engine_fp8_tensor.log
fi
if [ "$PHASE" = q ]; then
  FA=(--fp8_attention "${FP8_BLOCKS:-128,128,8,2,fp8;128,128,8,3,fp8;128,64,4,3,fp8;128,64,8,3,fp8;64,64,4,3,fp8;128,128,8,2,bf16;128,64,4,3,bf16;128,64,8,2,bf16}")
  K=($PY bench/kv_cache_kernels.py); [ -n "${DRY:-}" ] && K=(env TRITON_INTERPRET=1 $PY bench/kv_cache_kernels.py --dry)
  [ -n "${DRY:-}" ] && FA=(--fp8_attention "16,16,4,1,fp8;16,32,4,1,bf16")
  step q_fp8_attention ${QK_LIMIT:-170} "${K[@]}" "${FA[@]}"
  sed -n '/^fp8 attention/,$p' /tmp/step_q_fp8_attention.log
  BEST=$(grep -h '^BEST_BLOCKS' /tmp/step_q_fp8_attention.log | awk '{print $2}')
  if [ -n "$BEST" ]; then
    export LIVEAVATAR_FP8_ATTENTION_BLOCKS=$BEST
    E="bench/engine_gpu.py --config $FULL --random_weights"; [ -n "${DRY:-}" ] && E="bench/engine_gpu.py --dry"
    # the preset's decode (chunk 3, channels-last) and float8 (tensor): the headline's float8-window row
    step q_engine_fp8_attention ${QE_LIMIT:-230} $PY $E --set runtime.text_encoder_device cpu \
         --set model.text_encoder.tokenizer bytes --set model.text_encoder.num_layers 2 --set video.fps 25 \
         --set runtime.fp8 tensor --set runtime.compile $COMPILE --set sampler.kv_update per_step \
         --set runtime.kv_cache_dtype float8 --warmup 1 --clips 3 --profile kv8_attn_fp8 \
         --variant kv8_attn_sdpa runtime.attention_backend=auto --variant kv8_attn_fp8 runtime.attention_backend=fp8
    grep -h "^LOAD" /tmp/step_q_engine_fp8_attention.log
    grep -h "float8 attention\|attention_backend fp8" /tmp/step_q_engine_fp8_attention.log | head -3
    echo "engine run with LIVEAVATAR_FP8_ATTENTION_BLOCKS=$BEST"
    sed -n '/^| variant/,$p' /tmp/step_q_engine_fp8_attention.log
  else
    echo "no float8 attention configuration passed and beat widening + SDPA: engine path not run"
  fi
fi
echo "=== table"
$PY bench/table.py "$RES"
