# Two commands do everything: `make run` and `make test`. Each installs what it needs on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTAMP := $(VENV)/.system-packages
ARGS ?=

.PHONY: setup run test offline train-tiny accept-tiny clean

setup: $(STAMP) $(SYSTAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Speech synthesis and a headless browser for the tests, PulseAudio (client_cam's virtual microphone) and
# PortAudio (client_cam's --mic), ffmpeg (the RTMP ingest of the push test) (Debian packages).
$(SYSTAMP):
	@mkdir -p $(VENV)
	@if command -v espeak-ng >/dev/null && command -v sox >/dev/null && command -v chromium >/dev/null \
	  && command -v pulseaudio >/dev/null && ldconfig -p | grep -q libportaudio.so.2 \
	  && command -v ffmpeg >/dev/null; then :; else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng sox chromium pulseaudio libportaudio2 ffmpeg >/dev/null; \
	fi
	touch $@

run: $(STAMP)
	$(VPY) run_server.py $(ARGS)

test: setup
	$(VPY) -m pytest -q $(ARGS)

offline: $(STAMP)
	$(VPY) run_server.py offline $(ARGS)

# Train the embedded tiny avatar into model/assets/tiny_avatar.safetensors. With a CUDA GPU: the shipped
# recipe, about 18 minutes (training/device_train.sh: speech banks, VAE, then the DiT and the decoder's
# streaming fine-tune side by side, then the bundle). Without one: a resumable CPU run of training/train_tiny.py
# with ARGS (e.g. ARGS='--vae-steps 20 --dit-steps 20 --num-streams 16').
train-tiny: setup
	@if $(VPY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  PY=$(abspath $(VPY)) bash training/device_train.sh prepare && PY=$(abspath $(VPY)) bash training/device_train.sh all; \
	else \
	  $(VPY) -m training.train_tiny $(ARGS); \
	fi

# The trained bundle's acceptance check as served, 2-minute streams: identity >= 22 dB outside the mouth per 30 s,
# drift <= 1 dB, held-out lip sync >= 0.7 at lag 0 or +-1 frame.
accept-tiny: setup
	$(VPY) -m pytest -q training/acceptance

clean:
	rm -rf $(VENV) .pytest_cache artifacts
