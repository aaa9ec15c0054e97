"""`torchrun ... run_server.py`: launches that cannot work stop with one clear message and exit code 2."""
from __future__ import annotations

import pytest

import run_server


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}, "3 DiT ranks do not divide the DiT's 4 attention heads"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR/MASTER_PORT are unset"),
])
def test_bad_group_launch_exits_2_naming_the_problem(monkeypatch, capsys, env, expected) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run_server.main(["--config", "configs/tiny.yaml", "--port", "0"]) == 2
    assert expected in capsys.readouterr().err


def test_vae_rank_is_refused_by_the_server_with_advice(monkeypatch, capsys) -> None:
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert run_server.main(["--config", "configs/tiny.yaml", "--parallel.vae_rank", "true"]) == 2
    assert "--parallel.vae_rank false" in capsys.readouterr().err
