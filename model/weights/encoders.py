"""The encoders of a published Wan2.2-S2V-14B folder, read in their own layouts and names.

    Wan2.1_VAE.pth                      torch state dict, Wan2.2 `wan/modules/vae2_1.py` names -> diffusers
                                        `AutoencoderKLWan` (renames as diffusers scripts/convert_wan_to_diffusers.py
                                        `convert_vae`, derived here from the structure so any num_res_blocks works)
    models_t5_umt5-xxl-enc-bf16.pth     torch state dict, Wan2.2 `wan/modules/t5.py` `T5Encoder` names ->
                                        transformers `UMT5EncoderModel` (relative position bias in every layer)
    google/umt5-xxl/                    the tokenizer (read by model/encoders/text.py, local files only)
    wav2vec2-large-xlsr-53-english/     transformers folder (config.json + model.safetensors or pytorch_model.bin)
                                        of a `Wav2Vec2ForCTC`: `wav2vec2.` prefix dropped, CTC/pre-training heads
                                        ignored, legacy weight-norm names (weight_g/weight_v) mapped

Folder layout as Wan2.2 `wan/configs/wan_s2v_14B.py` (t5_checkpoint, t5_tokenizer, vae_checkpoint, wav2vec) and
LiveAvatar `causal_s2v_pipeline_tpp.py` L126-181 join them to the checkpoint folder. The .pth files are opened
with `mmap=True`, so their tensors stay in the page cache until each is copied, one at a time, to the target
device and dtype; names and shapes are checked before the first copy.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from model.config import AudioEncoderConfig, VAEConfig
from model.weights.checkpoint import CheckpointError, _assign, _check_fit, _placement, rename_key

log = logging.getLogger(__name__)

VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"
WAV2VEC2_FILES = ("model.safetensors", "pytorch_model.bin")

# ----------------------------------------------------------------------------- VAE names

_RESIDUAL_TO_DIFFUSERS = [
    (r"\.residual\.0\.gamma$", ".norm1.gamma"),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.gamma$", ".norm2.gamma"),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
]
_VAE_FIXED_TO_DIFFUSERS = [
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
]


def wan_vae_to_diffusers(key: str, num_res_blocks: int) -> str:
    """Wan2.1 VAE name -> `AutoencoderKLWan` name.

    Wan's decoder is one flat Sequential: per stage num_res_blocks + 1 residual blocks then a Resample (none
    after the last); diffusers groups them as up_blocks.<stage>.resnets.<j> / .upsamplers.0.
    """
    match = re.match(r"^decoder\.upsamples\.(\d+)\.(.*)$", key)
    if match:
        per_stage = num_res_blocks + 2
        stage, slot = divmod(int(match[1]), per_stage)
        where = f"resnets.{slot}" if slot <= num_res_blocks else "upsamplers.0"
        key = f"decoder.up_blocks.{stage}.{where}.{match[2]}"
    return rename_key(rename_key(key, _VAE_FIXED_TO_DIFFUSERS), _RESIDUAL_TO_DIFFUSERS)


def diffusers_vae_to_wan(key: str, num_res_blocks: int) -> str:
    """`AutoencoderKLWan` name -> Wan2.1 VAE name (inverse of `wan_vae_to_diffusers`, to write the file)."""
    for ours, wan in [
        (r"\.norm1\.gamma$", ".residual.0.gamma"),
        (r"\.conv1\.", ".residual.2."),
        (r"\.norm2\.gamma$", ".residual.3.gamma"),
        (r"\.conv2\.", ".residual.6."),
        (r"\.conv_shortcut\.", ".shortcut."),
    ]:
        if re.search(r"(down_blocks|resnets)\.\d+" + ours, key):
            key = re.sub(ours, wan, key)
    for ours, wan in [
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    ]:
        key = re.sub(ours, wan, key)
    match = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", key)
    if match:
        slot = int(match[3]) if match[3] is not None else num_res_blocks + 1
        key = f"decoder.upsamples.{int(match[1]) * (num_res_blocks + 2) + slot}.{match[4]}"
    return key


# ----------------------------------------------------------------------------- umT5 names

_T5_TO_TRANSFORMERS = [
    (r"^token_embedding\.weight$", "shared.weight"),
    (r"^norm\.weight$", "encoder.final_layer_norm.weight"),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (
        r"^blocks\.(\d+)\.pos_embedding\.embedding\.",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.",
    ),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),  # GELU branch
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),  # linear branch
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
]
_T5_TO_WAN = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
        r"blocks.\1.pos_embedding.embedding.",
    ),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
]


def wan_t5_to_transformers(key: str) -> str:
    """Wan `T5Encoder` name -> transformers `UMT5EncoderModel` name."""
    return rename_key(key, _T5_TO_TRANSFORMERS)


def transformers_t5_to_wan(key: str) -> str:
    """`UMT5EncoderModel` name -> Wan `T5Encoder` name (inverse of `wan_t5_to_transformers`)."""
    return rename_key(key, _T5_TO_WAN)


# ----------------------------------------------------------------------------- wav2vec2 names

# Heads of Wav2Vec2ForCTC / ForPreTraining and the training-time mask vector: not part of Wav2Vec2Model.
_WAV2VEC2_IGNORED = re.compile(
    r"^(lm_head\.|quantizer\.|project_q\.|project_hid\.|dropout_features|masked_spec_embed)"
)


def wav2vec2_checkpoint_to_model(key: str) -> str | None:
    """Published wav2vec2 name -> `Wav2Vec2Model` name, or None for the parts the encoder does not use."""
    key = key.removeprefix("wav2vec2.")
    if _WAV2VEC2_IGNORED.match(key):
        return None
    key = re.sub(r"\.conv\.weight_g$", ".conv.parametrizations.weight.original0", key)
    return re.sub(r"\.conv\.weight_v$", ".conv.parametrizations.weight.original1", key)


# ----------------------------------------------------------------------------- reading and filling


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A torch-saved state dict, memory-mapped (tensors are read from disk when copied), weights only."""
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from the checkpoint folder {path.parent}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise CheckpointError(f"{path} is not a readable torch state dict: {exc}") from None
        log.warning("%s is in torch's legacy format and cannot be memory-mapped; reading it whole", path)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (unpickling raises many unrelated types)
        raise CheckpointError(f"{path} is not a readable torch state dict: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def _expected(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once: umT5's encoder.embed_tokens is `shared`) and persistent buffers."""
    persistent = set(module.state_dict(keep_vars=True))
    buffers = {n: b for n, b in module.named_buffers() if n in persistent}
    return {**dict(module.named_parameters()), **buffers}


def fill_module(
    module: nn.Module,
    where: str,
    read: Callable[[str], torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    rename: Callable[[str], str | None],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    hint: str,
) -> nn.Module:
    """Check names/shapes of a whole file against `module`, then copy tensor by tensor into it.

    `read(name)` gives the file's tensor, `shapes` the file's names and shapes, `rename` the module's name for
    a file name (None: not used by the module). Meta tensors go to device/dtype; others keep theirs.
    """
    current = _expected(module)
    expected = {k: v.shape for k, v in current.items()}
    ours: dict[str, str] = {}
    for name in shapes:
        target = rename(name)
        if target is None:
            continue
        if target in ours:
            raise CheckpointError(f"{where}: {ours[target]} and {name} both map to {target}")
        ours[target] = name
    _check_fit(where, expected, {k: shapes[v] for k, v in ours.items()}, ours, hint)
    aliases = _tied_aliases(module)
    for target, name in ours.items():
        place, cast = _placement(target, current[target], device, dtype, lambda _: False)
        tensor = read(name)
        _assign(module, target, tensor.to(place, cast if tensor.dtype.is_floating_point else tensor.dtype))
    for alias, canonical in aliases.items():  # keep tied weights one tensor
        *parents, leaf = alias.split(".")
        owner = module.get_submodule(".".join(parents))
        owner._parameters[leaf] = module.get_parameter(canonical)
    return module.eval()


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """State-dict names that are the same Parameter as an earlier name (e.g. encoder.embed_tokens.weight)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _fill_from_state_dict(module, path, state, rename, device, dtype, hint) -> nn.Module:
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        return fill_module(module, str(path), state.__getitem__, shapes, rename, device, dtype, hint)
    finally:
        state.clear()  # drop the mapping so nothing outlives the copy


# ----------------------------------------------------------------------------- the three encoders


def load_wan_vae(
    vae: nn.Module,
    folder: Path,
    cfg: VAEConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fill an `AutoencoderKLWan` from the folder's Wan2.1_VAE.pth (original Wan names)."""
    path = Path(folder) / VAE_FILE
    state = read_torch_file(path)
    return _fill_from_state_dict(
        vae,
        path,
        state,
        lambda k: wan_vae_to_diffusers(k, cfg.num_res_blocks),
        device,
        dtype,
        "check that --model.vae.* matches the file (Wan2.1 VAE: base_dim 96, z_dim 16, num_res_blocks 2)",
    )


def load_umt5(
    model: nn.Module,
    folder: Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fill a `UMT5EncoderModel` from the folder's models_t5_umt5-xxl-enc-bf16.pth (Wan's T5Encoder names)."""
    path = Path(folder) / T5_FILE
    state = read_torch_file(path)
    return _fill_from_state_dict(
        model,
        path,
        state,
        wan_t5_to_transformers,
        device,
        dtype,
        "check that --model.text_encoder.* matches the file (umT5-XXL: vocab 256384, d_model 4096, 24 layers)",
    )


_WAV2VEC2_CONFIG_KEYS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "conv_dim": "conv_dim",
}


def check_wav2vec2_config(folder: Path, cfg: AudioEncoderConfig) -> dict:
    """The folder's config.json, refused unless its sizes are the config's and it is the layer-norm variant."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"no wav2vec2 model at {folder}: expected config.json and {' or '.join(WAV2VEC2_FILES)} there "
            f"(the {WAV2VEC2_DIR} folder of the Wan2.2-S2V-14B checkpoint)"
        )
    config = json.loads(config_path.read_text())
    wrong = []
    for ours, theirs in _WAV2VEC2_CONFIG_KEYS.items():
        want = getattr(cfg, ours)
        have = config.get(theirs)
        if (list(have) if isinstance(have, (list, tuple)) else have) != (
            list(want) if isinstance(want, (list, tuple)) else want
        ):
            wrong.append(f"{theirs}={have} (model.audio_encoder.{ours}={want})")
    if config.get("feat_extract_norm", "group") != "layer" or not config.get("do_stable_layer_norm", False):
        wrong.append(
            f"feat_extract_norm={config.get('feat_extract_norm')!r}, do_stable_layer_norm="
            f"{config.get('do_stable_layer_norm')} (the encoder is built as the xlsr-53 layer-norm variant)"
        )
    if wrong:
        raise CheckpointError(f"{config_path} does not match the audio encoder config: " + "; ".join(wrong))
    return config


def load_wav2vec2(
    model: nn.Module,
    folder: Path,
    cfg: AudioEncoderConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fill a `Wav2Vec2Model` from the folder's wav2vec2-large-xlsr-53-english subfolder (never downloads)."""
    subfolder = Path(folder) / WAV2VEC2_DIR
    check_wav2vec2_config(subfolder, cfg)
    hint = "check that --model.audio_encoder.* matches the folder's config.json"
    safetensors_path = subfolder / WAV2VEC2_FILES[0]
    if safetensors_path.is_file():
        with safe_open(str(safetensors_path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            return fill_module(
                model,
                str(safetensors_path),
                f.get_tensor,
                shapes,
                wav2vec2_checkpoint_to_model,
                device,
                dtype,
                hint,
            )
    bin_path = subfolder / WAV2VEC2_FILES[1]
    if not bin_path.is_file():
        raise CheckpointError(f"{subfolder} holds neither {' nor '.join(WAV2VEC2_FILES)}")
    state = read_torch_file(bin_path)
    return _fill_from_state_dict(model, bin_path, state, wav2vec2_checkpoint_to_model, device, dtype, hint)
