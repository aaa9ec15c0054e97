"""run_server.py without the weights its config names: one error saying what is missing and how to get it,
before anything loads or listens (it used to surface as 'cannot listen on ...')."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "run_server.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_14b_preset_without_its_folder_names_the_repositories_and_the_download(tmp_path) -> None:
    done = _run(tmp_path, "--config", str(REPO / "configs" / "liveavatar_14b.yaml"), "--port", "0")
    assert done.returncode == 2, done.stderr
    assert "cannot listen" not in done.stderr
    assert done.stderr.startswith("error: --model.checkpoint 'ckpt/Wan2.2-S2V-14B' does not exist")
    assert "hf download Wan-AI/Wan2.2-S2V-14B --local-dir ckpt/Wan2.2-S2V-14B" in done.stderr
    assert "hf download Quark-Vision/Live-Avatar --local-dir ckpt/LiveAvatar" in done.stderr
    assert "loading the" not in done.stdout  # refused before the model


def test_offline_with_a_missing_lora_says_so(tmp_path) -> None:
    done = _run(tmp_path, "offline", "--audio", "a.wav", "--image", "f.png", "--out", "o.mp4", "--model.lora", "Quark-Vision/Live-Avatar")
    assert done.returncode == 2, done.stderr
    assert "error: --model.lora 'Quark-Vision/Live-Avatar' does not exist" in done.stderr
    assert str(tmp_path / "empty-cache") in done.stderr


def test_serve_reports_weights_that_vanish_before_loading_as_missing_weights_not_a_socket(tmp_path, capsys) -> None:
    from model.config import load_config
    from server.app import serve

    missing = tmp_path / "tiny_avatar.safetensors"
    assert serve(load_config(None, {"model.checkpoint": str(missing), "server.port": 0})) == 2
    err = capsys.readouterr().err
    assert f"--model.checkpoint '{missing}' does not exist" in err and "cannot listen" not in err
