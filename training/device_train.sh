#!/usr/bin/env bash
# Train the tiny avatar on one GPU in two calls that each stop themselves within WALL_S seconds.
#
#   bash training/device_train.sh prepare   # here (needs espeak-ng): speech banks into $IN
#   bash training/device_train.sh 1         # GPU call 1: the VAE -> $OUT/phase1/{parts/*.safetensors,log.txt,...}
#   bash training/device_train.sh 2         # GPU call 2: the DiT on $IN/phase1/parts -> $OUT/phase2/tiny_avatar.safetensors
#   bash training/device_train.sh 2s        # GPU call 2 of the 20-minute recipe: the DiT and the decoder's streaming
#                                           #   fine-tune side by side, both from $IN/phase1/parts
#                                           #   -> $OUT/phase2/parts/{dit,encoders}, $OUT/phase3b/parts/vae
#   bash training/device_train.sh bundle    # here: $IN/phase2 + $IN/phase3b parts -> model/assets/tiny_avatar.safetensors
#   bash training/device_train.sh q         # GPU call: the whole recipe in one call (VAE, then DiT + decoder side by
#                                           #   side) -> $OUT/phase2/parts/{dit,encoders}, $OUT/phase3b/parts/vae
#   bash training/device_train.sh c         # GPU call: both continued from q's parts (copied into $IN) -> the same
#   bash training/device_train.sh all       # a GPU machine without a per-call limit: 1, 2s and bundle in a row
#   bash training/device_train.sh 3         # GPU call: decoder fine-tune on long streams from $IN/phase3/parts
#                                           #   -> $OUT/phase3b/{parts/*.safetensors,log.txt,eval_drift.json,eval.json}
#   bash training/device_train.sh d         # GPU call: a new, narrower decoder for each width in DECODER_DIMS (default
#                                           #   "8"), side by side, on the shipped bundle's frozen encoder, trained on
#                                           #   long streams from random weights -> $OUT/d<width>/{vae.safetensors,log.txt}
#                                           #   (FRESH_DECODER=0 INIT_BUNDLE=<a dbundle output>: continue that decoder)
#   bash training/device_train.sh dbundle   # here: the shipped bundle with $IN/d<DECODER_DIM>/vae.safetensors as its VAE
#   DRY=1 bash training/device_train.sh 1   # the same code for a few steps on the CPU (then DRY=1 ... 2)
#
# $IN (default artifacts/device_in, ignored by git) holds speech_bank.npz, heldout_bank.npz and, for
# phase 2, phase1/parts/ (copy phase 1's returned phase1/ folder there). Wheels in .whl/ (diffusers and
# its importlib_metadata) are installed first when present: the GPU machine has no diffusers.
set -euo pipefail
PHASE=${1:?usage: device_train.sh prepare|q|c|1|2|2s|bundle|all|3|d|dbundle}
IN=${IN:-artifacts/device_in}
OUT=${OUT:-artifacts/device_out}
DRY=${DRY:-0}
WALL_S=${WALL_S:-535}   # the whole command, pip install included; the device call allows 560
UTTERANCES=${UTTERANCES:-120}  # training utterances of the GPU recipe (prepare makes them; ~19 MB travel)

if [ "$PHASE" = prepare ]; then
  PY=${PY:-.venv/bin/python}
  mkdir -p "$IN"
  # Synthesizers and effects of the training speech (Debian packages): espeak-ng, flite (a second synthesizer),
  # sox (voice changes, rooms). Debian bookworm's main archive has no mbrola voices.
  if ! command -v espeak-ng >/dev/null || ! command -v flite >/dev/null || ! command -v sox >/dev/null; then
    SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng flite sox >/dev/null
  fi
  # The training utterances (training/voices.py: both synthesizers, voice changes, rooms, the Opus round trip;
  # made once, then reused from the file), at the tiny preset's audio rate, as many as the GPU phases train on
  PYTHONPATH=. "$PY" -c "import sys; from pathlib import Path; from model.config import load_config; \
from training.train_tiny import speech_bank; \
speech_bank(Path(sys.argv[1]), int(sys.argv[2]), load_config(None).audio_sample_rate_hz)" "$IN/speech_bank.npz" "$UTTERANCES"
  PYTHONPATH=. "$PY" -m training.lip_sync_check --save-bank "$IN/heldout_bank.npz" --count 4
  # Photographs for backdrops and still streams: scikit-image's sample photos, read from its wheel (pip download)
  test -f "$IN/photos.npz" || PYTHONPATH=. "$PY" -m training.photos --out "$IN/photos.npz"
  ls -la "$IN"
  exit 0
fi

if [ "$PHASE" = q ] || [ "$PHASE" = c ]; then
  # q: the whole recipe in one call of WALL_S: the VAE for VAE_S seconds, then the DiT on its own rollouts and
  #    the decoder's streaming fine-tune side by side for the rest.
  # c: a second call that continues both from q's returned parts (in $IN/phase2, $IN/phase3b), at lower rates.
  # Either returns only what the bundle takes ($OUT/phase2/parts/{dit,encoders}, $OUT/phase3b/parts/vae) and
  # one log: the device call brings back at most 8 files.
  INNER=${WORK:-/tmp/device_train}/$PHASE; rm -rf "$INNER"; mkdir -p "$INNER"
  if [ "$PHASE" = q ]; then
    # fine-tunes of the shipped networks: lower peaks than from random weights, rollouts almost from the start
    export EXTRA_VAE=${EXTRA_VAE:-"--vae-lr 6e-4"} EXTRA_DIT=${EXTRA_DIT:-"--dit-lr 4e-4 --teacher-until 0.1"}
    WALL_S=${VAE_S:-200} OUT="$INNER/out1" WORK="$INNER/work1" bash "$0" 1 >"$INNER/phase1.log" 2>&1 \
      || { tail -n 30 "$INNER/phase1.log"; exit 1; }
    rm -rf "$IN/phase1"; cp -r "$INNER/out1/phase1" "$IN/phase1"
  else
    for f in phase2/parts/dit phase2/parts/encoders phase3b/parts/vae; do
      test -f "$IN/$f.safetensors" || { echo "no $IN/$f.safetensors: copy the q call's phase2/ and phase3b/ into $IN" >&2; exit 2; }
    done
    rm -rf "$IN/phase1"; mkdir -p "$IN/phase1/parts"
    cp "$IN/phase2/parts/dit.safetensors" "$IN/phase2/parts/encoders.safetensors" "$IN/phase3b/parts/vae.safetensors" \
      "$IN/phase1/parts/"
    export EXTRA_DIT=${EXTRA_DIT:-"--dit-lr 3e-4 --teacher-until 0"} EXTRA_STREAM=${EXTRA_STREAM:-"--stream-lr 1.5e-4"}
  fi
  WALL_S=$((WALL_S - SECONDS)) OUT="$INNER/out2" WORK="$INNER/work2" bash "$0" 2s >"$INNER/phase2.log" 2>&1
  RC=$?
  mkdir -p "$OUT/phase2/parts" "$OUT/phase3b/parts"
  cat "$INNER/phase1.log" "$INNER/out2/phase2/log.txt" "$INNER/out2/phase3b/log.txt" "$INNER/phase2.log" \
    >"$OUT/log.txt" 2>/dev/null
  cp "$INNER/out2/phase2/parts/"*.safetensors "$OUT/phase2/parts/" && cp "$INNER/out2/phase3b/parts/vae.safetensors" \
    "$OUT/phase3b/parts/" || RC=1
  grep -h '"phase"' "$INNER/phase1.log" | tail -n 2
  grep -h '"phase"' "$INNER/out2/phase2/log.txt" | tail -n 3
  grep -h '"phase"' "$INNER/out2/phase3b/log.txt" | tail -n 2
  echo "phase $PHASE done in $SECONDS s, rc $RC"; ls -laR "$OUT"
  exit $RC
fi

if [ "$PHASE" = all ]; then
  # Each phase is its own process with its own WALL_S, as on the device tool.
  bash "$0" 1
  mkdir -p "$IN" && rm -rf "$IN/phase1" && cp -r "$OUT/phase1" "$IN/phase1"
  bash "$0" 2s
  rm -rf "$IN/phase2" "$IN/phase3b" && cp -r "$OUT/phase2" "$OUT/phase3b" "$IN/"
  bash "$0" bundle
  exit 0
fi
if [ "$PHASE" = dbundle ]; then
  # The shipped DiT and encoders with the narrower VAE decoder of a `d` call (configs/tiny.yaml names its width).
  PY=${PY:-.venv/bin/python}
  DIM=${DECODER_DIM:-8}
  test -f "$IN/d$DIM/vae.safetensors" || { echo "no $IN/d$DIM/vae.safetensors: copy the d call's d$DIM/ into $IN" >&2; exit 2; }
  SHIPPED=${INIT_BUNDLE:-model/assets/tiny_avatar.safetensors}
  # a copy of the bundle read (the output may overwrite it) and the part, outside $IN (which travels to the GPU)
  TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT; mkdir -p "$TMP/merged"
  cp "$IN/d$DIM/vae.safetensors" "$TMP/merged/"
  cp "$SHIPPED" "$TMP/before.safetensors"
  MERGED=$TMP/merged
  PYTHONPATH=. "$PY" -m training.train_tiny --bundle-only --init-bundle "$TMP/before.safetensors" --fresh-decoder \
    --init-from "$MERGED" --set model.vae.decoder_base_dim=$DIM --out "${BUNDLE:-model/assets/tiny_avatar.safetensors}"
  exit 0
fi
if [ "$PHASE" = bundle ]; then
  # The DiT side (DiT, wav2vec2, text encoder) of the DiT run and the VAE of the decoder fine-tune.
  PY=${PY:-.venv/bin/python}
  for f in phase2/parts/dit phase2/parts/encoders phase3b/parts/vae; do
    test -f "$IN/$f.safetensors" || { echo "no $IN/$f.safetensors: copy the 2s call's phase2/ and phase3b/ into $IN" >&2; exit 2; }
  done
  MERGED=$IN/merged_parts; rm -rf "$MERGED"; mkdir -p "$MERGED"
  cp "$IN/phase2/parts/dit.safetensors" "$IN/phase2/parts/encoders.safetensors" "$IN/phase3b/parts/vae.safetensors" "$MERGED/"
  PYTHONPATH=. "$PY" -m training.train_tiny --bundle-only --init-from "$MERGED" --out "${BUNDLE:-model/assets/tiny_avatar.safetensors}"
  exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
if [ "$DRY" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  WORK=${WORK:-/tmp/device_train_dry}
  # Same code, a few steps: CPU, 2 threads, tiny batches, short evaluation.
  COMMON=(--device cpu --workers 1 --num-utterances 4 --num-streams 6 --num-identities 4
          --vae-steps 1 --vae-batch 1 --vae-frames 4 --dit-steps 1 --dit-batch 1 --checkpoint-every 1
          --log-every 1 --eval-samples 1 --eval-clips 2 --latent-fit-videos 2 --rollout-max-clips 2
          --stream-steps 1 --stream-batch 1 --stream-clips 2 --stream-burn 1 --drift-clips 2
          --drawn-share 0.3 --photo-share 0.3)
else
  PY=${PY:-python3}
  WORK=${WORK:-/tmp/device_train}
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  COMMON=(--device cuda --workers 15 --num-utterances $UTTERANCES --num-streams 640 --num-identities 400
          --vae-steps 100000 --vae-batch 48 --vae-frames 12 --dit-steps 100000 --dit-batch ${DIT_BATCH:-48}
          --checkpoint-every 100 --log-every 25 --eval-samples 2 --eval-clips 8 --rollout-max-clips 8
          --stream-steps 100000 --stream-batch 16 --stream-clips 6 --stream-burn 6 --drift-clips 8)
fi
# Every network starts from the shipped bundle (INIT_BUNDLE= for random weights): the VAE phase fine-tunes its
# VAE on the new faces, the DiT phase moves its DiT to the reference scheme on its own rollouts.
COMMON+=(--speech-bank "$IN/speech_bank.npz" --heldout-bank "$IN/heldout_bank.npz" --photo-bank "$IN/photos.npz")
INIT_BUNDLE=${INIT_BUNDLE-model/assets/tiny_avatar.safetensors}
[ -z "$INIT_BUNDLE" ] || COMMON+=(--init-bundle "$INIT_BUNDLE")
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'cuda', torch.cuda.is_available())"

case "$PHASE" in
  1)
    mkdir -p "$OUT/phase1"
    rm -rf "$WORK/phase1"
    "$PY" -m training.train_tiny "${COMMON[@]}" --phases vae --wall-s $((WALL_S - SECONDS)) --reserve-s 25 \
      --work-dir "$WORK/phase1" --parts-dir "$OUT/phase1/parts" ${EXTRA_VAE:-} 2>&1 | tee "$OUT/phase1/log.txt"
    cp "$WORK/phase1/summary.json" "$OUT/phase1/"
    cp "$WORK/phase1/eval_vae.json" "$OUT/phase1/" 2>/dev/null || true
    ;;
  2)
    test -f "$IN/phase1/parts/vae.safetensors" || { echo "no $IN/phase1/parts: copy phase 1's phase1/ folder into $IN" >&2; exit 2; }
    mkdir -p "$OUT/phase2"
    rm -rf "$WORK/phase2"
    "$PY" -m training.train_tiny "${COMMON[@]}" --init-from "$IN/phase1/parts" --wall-s $((WALL_S - SECONDS)) \
      --reserve-s 50 --work-dir "$WORK/phase2" --parts-dir "$OUT/phase2/parts" \
      --out "$OUT/phase2/tiny_avatar.safetensors" 2>&1 | tee "$OUT/phase2/log.txt"
    cp "$WORK/phase2/summary.json" "$OUT/phase2/"
    cp "$WORK/phase2/eval.json" "$OUT/phase2/" 2>/dev/null || true
    ;;
  2s)
    # Both start from phase 1's parts and neither reads what the other trains (the fine-tune freezes the encoder,
    # so the DiT's latents are the same); each alone leaves the GPU mostly idle (small kernels), so side by side
    # they take one call instead of two. Evaluation is left to the merged bundle (`bundle`, then the tests).
    test -f "$IN/phase1/parts/vae.safetensors" || { echo "no $IN/phase1/parts: copy phase 1's phase1/ folder into $IN" >&2; exit 2; }
    mkdir -p "$OUT/phase2" "$OUT/phase3b"
    rm -rf "$WORK/phase2" "$WORK/phase3b"
    HALF=(--workers $(( $(nproc) / 2 > 1 ? $(nproc) / 2 - 1 : 1 )) --eval-samples 0)
    # EXTRA_DIT / EXTRA_STREAM: more flags for either process (a continuation's learning rates, say)
    "$PY" -m training.train_tiny "${COMMON[@]}" "${HALF[@]}" --init-from "$IN/phase1/parts" \
      --wall-s $((WALL_S - SECONDS)) --reserve-s 25 --work-dir "$WORK/phase2" --parts-dir "$WORK/phase2/parts" \
      --out "$WORK/phase2/tiny_avatar.safetensors" ${EXTRA_DIT:-} >"$OUT/phase2/log.txt" 2>&1 &
    DIT_PID=$!
    "$PY" -m training.train_tiny "${COMMON[@]}" "${HALF[@]}" --phases vae_stream --init-from "$IN/phase1/parts" \
      --wall-s $((WALL_S - SECONDS)) --reserve-s 25 --work-dir "$WORK/phase3b" --parts-dir "$WORK/phase3b/parts" \
      ${EXTRA_STREAM:-} >"$OUT/phase3b/log.txt" 2>&1 &
    STREAM_PID=$!
    RC=0; wait $DIT_PID || RC=$?; wait $STREAM_PID || RC=$?
    tail -n 4 "$OUT/phase2/log.txt" "$OUT/phase3b/log.txt"
    cp "$WORK/phase2/summary.json" "$OUT/phase2/" 2>/dev/null || true
    cp "$WORK/phase3b/summary.json" "$OUT/phase3b/" 2>/dev/null || true
    # Only the parts the bundle takes: the device call returns at most 8 files.
    mkdir -p "$OUT/phase2/parts" "$OUT/phase3b/parts"
    cp "$WORK/phase2/parts/dit.safetensors" "$WORK/phase2/parts/encoders.safetensors" "$OUT/phase2/parts/" || RC=1
    cp "$WORK/phase3b/parts/vae.safetensors" "$OUT/phase3b/parts/" || RC=1
    [ $RC -eq 0 ] || { echo "a 2s process exited $RC" >&2; exit $RC; }
    ;;
  3)
    # The decoder alone on reference + (burn-in +) 6 clips through one causal cache; the encoder (and so
    # the DiT's latents) unchanged. Only the part files come back: the bundle is over the transfer limit.
    test -f "$IN/phase3/parts/vae.safetensors" || { echo "no $IN/phase3/parts: copy the shipped run's parts there" >&2; exit 2; }
    mkdir -p "$OUT/phase3b"
    rm -rf "$WORK/phase3b"
    "$PY" -m training.train_tiny "${COMMON[@]}" --phases vae_stream --init-from "$IN/phase3/parts" \
      --wall-s $((WALL_S - SECONDS)) --reserve-s 70 --work-dir "$WORK/phase3b" --parts-dir "$OUT/phase3b/parts" \
      2>&1 | tee "$OUT/phase3b/log.txt"
    cp "$WORK/phase3b/summary.json" "$OUT/phase3b/"
    cp "$WORK/phase3b/eval_drift.json" "$WORK/phase3b/eval.json" "$OUT/phase3b/" 2>/dev/null || true
    ;;
  d)
    # One process per width, side by side (each alone leaves the GPU mostly idle): the shipped encoder frozen (the
    # DiT's latents unchanged), post_quant_conv and a decoder of base width W from random weights, trained on
    # reference + burn-in + 6 clips through the carried cache, as the server decodes.
    DIMS=(${DECODER_DIMS:-8})
    WORKERS=$(( $(nproc) / ${#DIMS[@]} > 1 ? $(nproc) / ${#DIMS[@]} - 1 : 1 ))
    PIDS=()
    for W in "${DIMS[@]}"; do
      mkdir -p "$OUT/d$W"; rm -rf "$WORK/d$W"
      "$PY" -m training.train_tiny "${COMMON[@]}" --workers $WORKERS --eval-samples 0 --phases vae_stream \
        $( [ "${FRESH_DECODER:-1}" = 1 ] && echo --fresh-decoder ) --set model.vae.decoder_base_dim=$W \
        --stream-lr ${DECODER_LR:-1e-3} \
        --wall-s $((WALL_S - SECONDS)) --reserve-s 20 --work-dir "$WORK/d$W" --parts-dir "$WORK/d$W/parts" \
        ${EXTRA_DECODER:-} >"$OUT/d$W/log.txt" 2>&1 &
      PIDS+=($!)
    done
    RC=0; for P in "${PIDS[@]}"; do wait $P || RC=$?; done
    for W in "${DIMS[@]}"; do
      tail -n 3 "$OUT/d$W/log.txt"; grep -h '"phase"' "$OUT/d$W/log.txt" | tail -n 2
      cp "$WORK/d$W/parts/vae.safetensors" "$OUT/d$W/" || RC=1
    done
    [ $RC -eq 0 ] || { echo "a d process exited $RC" >&2; exit $RC; }
    ;;
  *)
    echo "unknown phase $PHASE: use prepare, 1, 2, 2s, bundle, all, 3, d or dbundle" >&2
    exit 2
    ;;
esac
echo "phase $PHASE done in $SECONDS s"
ls -laR "$OUT"
