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

# Speech synthesis and a headless browser for the tests (Debian packages).
$(SYSTAMP):
	@mkdir -p $(VENV)
	@if command -v espeak-ng >/dev/null && command -v sox >/dev/null && command -v chromium >/dev/null; then :; else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng sox chromium >/dev/null; \
	fi
	touch $@

run: $(STAMP)
	$(VPY) run_server.py $(ARGS)

test: setup
	$(VPY) -m pytest -q $(ARGS)

offline: $(STAMP)
	$(VPY) run_server.py offline $(ARGS)

# Train the embedded tiny avatar into model/assets/tiny_avatar.safetensors (resumable; on a GPU:
# ARGS='--device cuda --vae-time-s 110 --dit-time-s 200'). See training/train_tiny.py.
train-tiny: setup
	$(VPY) -m training.train_tiny $(ARGS)

# The trained bundle's acceptance check: held-out lip sync >= 0.7 at lag 0 or +-1 frame.
accept-tiny: setup
	$(VPY) -m pytest -q training/acceptance

clean:
	rm -rf $(VENV) .pytest_cache artifacts
