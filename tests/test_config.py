"""The presets load into typed objects, and every bad value is refused with the flag it came from."""
from __future__ import annotations

import pytest

from model.config import ConfigError, load_config, resolve_key
from run_server import main, parse_args


def test_tiny_preset_is_the_default_and_runs_on_cpu() -> None:
    cfg = load_config()
    assert cfg.model.preset == "tiny"
    assert cfg.runtime.device == "cpu"
    assert cfg.video.width % 16 == 0 and cfg.video.height % 16 == 0


def test_full_size_preset_has_the_14b_backbone() -> None:
    cfg = load_config("configs/liveavatar_14b.yaml")
    dit = cfg.model.dit
    assert (dit.dim, dit.num_layers, dit.num_heads, dit.ffn_dim) == (5120, 40, 40, 13824)
    assert (cfg.video.width, cfg.video.height, cfg.video.infer_frames) == (704, 384, 48)
    assert cfg.sampler.sample_steps == 4


def test_short_and_dotted_overrides_reach_the_same_key() -> None:
    assert resolve_key("sample_steps") == "sampler.sample_steps"
    assert resolve_key("sampler.sample-steps") == "sampler.sample_steps"
    assert load_config(overrides={"sample_steps": "2"}).sampler.sample_steps == 2
    assert load_config(overrides={"sampler.sample_steps": 3}).sampler.sample_steps == 3


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("sample_steps", "0", "--sampler.sample_steps: must be in 1..8"),
        ("sample_steps", "100", "--sampler.sample_steps: must be in 1..8"),
        ("sample_steps", "x", "--sampler.sample_steps: expected an integer"),
        ("size", "704x384", "--video.size: must look like WIDTH*HEIGHT"),
        ("size", "100*100", "--video.size: width and height must be multiples of 16"),
        ("infer_frames", "10", "--video.infer_frames: must be a positive multiple of 4"),
        ("dtype", "int8", "--runtime.dtype: must be one of"),
        ("port", "70000", "--server.port: must be in 0..65535"),
        ("model.dit.num_heads", "3", "--model.dit.dim: must be a positive multiple of model.dit.num_heads"),
        ("stream_context_frames", "-1", "--model.vae.stream_context_frames: must be >= 0"),
        ("stream_context_frames", "12", "--model.vae.stream_restart_frames: must be >= 1 latent frame"),
        ("stream_restart_frames", "0", "--model.vae.stream_restart_frames: must be >= 1 latent frame"),
    ],
)
def test_bad_values_name_the_flag(flag: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides={flag: value})
    assert words in str(err.value)


def test_ambiguous_short_flag_lists_the_full_names() -> None:
    with pytest.raises(ConfigError, match="--num_heads: ambiguous, use one of --model.dit.num_heads"):
        load_config(overrides={"num_heads": "8"})


def test_unknown_flag_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="--no_such_flag: unknown option"):
        load_config(overrides={"no_such_flag": "1"})


def test_unknown_yaml_key_is_refused_by_name(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler:\n  sample_stepz: 4\n")
    with pytest.raises(ConfigError, match="--sampler.sample_stepz: unknown key"):
        load_config(bad)


def test_missing_config_file_is_named() -> None:
    with pytest.raises(ConfigError, match="--config: no such file 'nope.yaml'"):
        load_config("nope.yaml")


def test_command_line_overrides_every_key_and_reports_errors(capsys) -> None:
    command, _args, cfg = parse_args(["--port", "9001", "--sample_steps=2", "--host", "0.0.0.0"])
    assert command == "serve"
    assert (cfg.server.port, cfg.sampler.sample_steps, cfg.server.host) == (9001, 2, "0.0.0.0")
    assert main(["--sample_steps", "9"]) == 2
    assert "--sampler.sample_steps: must be in 1..8, got 9" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["...", "yes", "a person: smiling", "- hi", "[unclosed", "off"])
def test_string_flags_take_the_text_as_typed(text: str) -> None:
    _command, _args, cfg = parse_args(["--prompt", text, "--virtualcam_mic", text, "--reference", text])
    assert (cfg.server.prompt, cfg.server.virtualcam_mic, cfg.server.reference) == (text, text, text)


def test_null_clears_a_string_key_that_may_be_null() -> None:
    assert load_config(overrides={"reference": "face.png"}).server.reference == "face.png"
    assert load_config(overrides={"reference": "null"}).server.reference is None


def test_a_flag_that_is_not_yaml_is_refused_naming_it(capsys) -> None:
    with pytest.raises(ConfigError, match=r"--sampler.sample_steps: '\[2' is not a value"):
        load_config(overrides={"sample_steps": "[2"})
    assert main(["--sample_steps", "[2"]) == 2
    assert "--sampler.sample_steps" in capsys.readouterr().err
