"""`run_server.py cluster`: flags that cannot work are refused naming the flag; without Ray one line says how
to install it; the pin it names is the one `make test` installs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import run_server
from cluster.launch import RAY_PIN, cluster_config
from model.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_without_ray_one_line_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    assert run_server.main(["cluster", "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install '{RAY_PIN}'" in err[0], err


def test_the_install_hint_names_the_pinned_version():
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert RAY_PIN in [line.split("#")[0].strip() for line in lines]


@pytest.mark.parametrize(("argv", "named"), [
    (["--replicas", "0"], "--replicas"),
    (["--ranks_per_replica", "0"], "--ranks_per_replica"),
    (["--config", "configs/liveavatar_14b.yaml"], "--gpus_per_replica 1"),
    (["--config", "configs/liveavatar_14b.yaml", "--gpus_per_replica", "2", "--ranks_per_replica", "1"],
     "--ranks_per_replica 1 with --gpus_per_replica 2"),
    (["--config", "configs/liveavatar_14b.yaml", "--gpus_per_replica", "0.5", "--ranks_per_replica", "2"],
     "must be equal"),
    (["--address", "none", "--replicas", "2"], "--address none"),
])
def test_flags_that_cannot_work_are_refused_naming_the_flag(argv, named, capsys):
    assert run_server.main(["cluster", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err, err


def test_a_token_from_the_environment_reaches_the_deployments(monkeypatch: pytest.MonkeyPatch):
    # the front runs in a Ray process that does not see this shell's environment
    monkeypatch.setenv("LIVEAVATAR_TOKEN", "s3cret")
    assert cluster_config(load_config(None, {})).server.token == "s3cret"
    assert cluster_config(load_config(None, {"server.token": "flag"})).server.token == "flag"
    monkeypatch.delenv("LIVEAVATAR_TOKEN")
    assert cluster_config(load_config(None, {})).server.token is None
