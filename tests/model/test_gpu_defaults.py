"""The 14B preset runs its fastest measured one-GPU settings where the GPU supports them, and plain ones elsewhere:
`runtime.fp8 auto` is float8 GEMMs on compute capability 8.9+ only, the VAE's chunk-3 channels-last decode
applies on CUDA only."""
from __future__ import annotations

import pytest
import torch

from model.config import ConfigError, load_config
from model.net.fp8 import resolve_mode


def test_the_14b_preset_defaults_to_the_fastest_measured_one_gpu_settings() -> None:
    runtime = load_config("configs/liveavatar_14b.yaml").runtime
    assert (runtime.fp8, runtime.compile, runtime.kv_cache_dtype) == ("auto", True, "model")
    assert (runtime.vae_decode_chunk, runtime.vae_channels_last, runtime.cudnn_benchmark) == (3, True, True)


def test_auto_is_the_references_per_tensor_float8_on_ada_and_hopper_only(monkeypatch) -> None:
    assert resolve_mode("auto", torch.device("cpu")) == "none"
    for mode in ("none", "weights", "gemm", "tensor"):
        assert resolve_mode(mode, torch.device("cpu")) == mode
    capability = {"cc": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cc"])
    assert resolve_mode("auto", torch.device("cuda", 0)) == "tensor"
    capability["cc"] = (8, 0)  # A100: no float8 tensor cores
    assert resolve_mode("auto", torch.device("cuda", 0)) == "none"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mode("auto", torch.device("meta")) == "none"


def test_auto_leaves_a_cpu_model_as_loaded() -> None:
    from tests.model.test_kv_update import _dit_and_inputs

    dit = _dit_and_inputs()[0]
    assert dit.quantize_fp8("auto") == 0 and not dit.is_fp8


def test_bad_fp8_mode_lists_auto() -> None:
    with pytest.raises(ConfigError, match=r"--runtime.fp8: must be one of .*'auto'"):
        load_config(None, {"runtime.fp8": "int8"})
