"""Checkpoints: published Wan2.2-S2V-14B layout (+ LiveAvatar LoRA merged at load), diffusers names, bundle.

Layouts
- original: a folder of `diffusion_pytorch_model-0000i-of-0000N.safetensors` shards with
  `diffusion_pytorch_model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {key: shard}}),
  or one `diffusion_pytorch_model.safetensors`; keys are Wan2.2 `wan/modules/s2v/model_s2v.py` module names
  (`blocks.0.self_attn.q.weight`, `head.modulation`, `casual_audio_encoder.*`,
  `audio_injector.injector.0.q.*`).
- diffusers: the same files (optionally under `transformer/`) with diffusers `WanS2VTransformer3DModel` names
  (diffusers pull request #12258 "Add Wan2.2-S2V", scripts/convert_wan_to_diffusers.py
  S2V_TRANSFORMER_KEYS_RENAME_DICT): the backbone as `WanTransformer3DModel`, the audio encoder under
  `condition_embedder.causal_audio_encoder.`, the pose conv as `condition_embedder.pose_embedder`, the mask as
  `trainable_condition_mask`, the audio cross-attention as q/k/v/o -> to_q/to_k/to_v/to_out.0. `AvatarDiT`'s
  own names (the backbone as diffusers, the S2V parts as Wan2.2) load too.
- the rest of a published folder (Wan2.1_VAE.pth, the umT5 .pth + tokenizer, the wav2vec2 folder):
  `model/weights/encoders.py`; the whole folder at once: `model/weights/published.py`.
- LoRA files (LiveAvatar's, applied as its loader does: full tensors replace, then pairs merge): `lora.py`;
  the names of every layout: `names.py`.
- bundle: one safetensors file of prefixed state dicts (`dit.`, `vae.`, `audio_encoder.`, `text_encoder.`),
  the AppConfig as JSON in the metadata (`save_bundle` / `load_bundle`).

Every tensor is read on its own with `safe_open` straight onto the target device, cast, and assigned into a
model built on the `meta` device, so a model is never in memory twice. Names and shapes are checked before the
first tensor is read; a mismatch raises one `CheckpointError` naming the file and the first bad keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model.config import AppConfig, DiTConfig, load_config_from_dict
from model.net.dit import AvatarDiT
from model.net.fp8 import Fp8Linear
from model.parallel.group import copy_full_into
from model.weights.lora import LoraFile, read_lora
from model.weights.names import (  # noqa: F401 (callers import the names from here too)
    SHOW_KEYS,
    CheckpointError,
    detect_renamer,
    diffusers_to_ours,
    original_to_ours,
    ours_to_diffusers,
    ours_to_original,
    rename_key,
)

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
BUNDLE_FORMAT = "liveavatar-server-bundle/1"


# ----------------------------------------------------------------------------- files


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name of a sharded or single-file checkpoint to the shard holding it."""
    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir() and not (path / INDEX_NAME).exists():
        path = path / "transformer"  # a diffusers pipeline folder
    if path.is_file():
        return {k: path for k in _safetensors_keys(path)}
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} does not exist: point --model.checkpoint at the folder with "
            f"{INDEX_NAME} (or {SINGLE_NAME})"
        )
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
        files = {k: path / shard for k, shard in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{index} lists shards that are not there: {absent[:SHOW_KEYS]}")
        return files
    single = path / SINGLE_NAME
    if single.is_file():
        return {k: single for k in _safetensors_keys(single)}
    raise CheckpointError(f"{path} holds neither {INDEX_NAME} nor {SINGLE_NAME}")


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # noqa: BLE001 (safetensors raises several unrelated error types)
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def write_sharded(
    tensors: dict[str, torch.Tensor],
    folder: str | Path,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write `tensors` as Hugging Face-style shards + index (the layout the Wan repos publish)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().contiguous().cpu()
        size += nbytes
    names = [
        f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata=metadata or {"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return [folder / n for n in names]


# ----------------------------------------------------------------------------- checks and assignment


_DIT_HINT = (
    "check that the config (--model.dit.*) matches the checkpoint's size and that the file is complete"
)


def _check_fit(
    where: str,
    expected: dict[str, torch.Size],
    found: dict[str, tuple[int, ...]],
    source_name: dict[str, str],
    hint: str = _DIT_HINT,
) -> None:
    """One error listing the first missing, unexpected and mis-shaped keys (names as in the file)."""
    missing = [k for k in expected if k not in found]
    unexpected = [source_name[k] for k in found if k not in expected]
    wrong = [
        f"{source_name[k]} {list(found[k])} (model wants {list(expected[k])})"
        for k in expected
        if k in found and tuple(expected[k]) != tuple(found[k])
    ]
    if not (missing or unexpected or wrong):
        return
    lines = [f"checkpoint {where} does not fit the model:"]
    if missing:
        lines.append(f"  missing {len(missing)} keys, first: {missing[:SHOW_KEYS]}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} keys, first: {unexpected[:SHOW_KEYS]}")
    if wrong:
        lines.append(f"  wrong shape for {len(wrong)} keys, first: {wrong[:SHOW_KEYS]}")
    lines.append(f"  {hint}")
    raise CheckpointError("\n".join(lines))


def checkpoint_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Each tensor's name and shape as a checkpoint stores it.

    Differs from `state_dict()` only for float8 layers (`model/net/fp8.py`), whose checkpoints hold the
    ordinary [out, in] weight and no scale; sharded parameters report their whole shape either way.
    """
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    for name, sub in module.named_modules():
        if isinstance(sub, Fp8Linear):
            prefix = f"{name}." if name else ""
            shapes[prefix + "weight"] = torch.Size((sub.out_features, sub.in_features))
            shapes.pop(prefix + "weight_scale", None)
    return shapes


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` at parameter/buffer `name`: replaced on modules built on the meta device; copied into
    a per-layer sharded parameter (this rank's rows) or quantised into a float8 layer, which stay in place."""
    *parents, leaf = name.split(".")
    owner = module
    for p in parents:
        owner = getattr(owner, p)
    if isinstance(owner, Fp8Linear) and leaf == "weight":
        owner.fill(tensor)
        return
    existing = owner._parameters.get(leaf)
    if existing is not None and hasattr(existing, "to_local"):
        with torch.no_grad():
            copy_full_into(existing, tensor.to(existing.dtype))
        return
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def fill_random(module: nn.Module, device: torch.device | str, seed: int) -> None:
    """`to_empty` on `device`, then fill every weight there: N(0, 1/fan_in) matrices, unit norms, zero biases.

    For random weights of a model too large to build whole (the 14B DiT: 56 GB in float32), and for
    per-layer sharded models: one whole parameter at a time, then this rank's shard of it. Float8 layers
    get a random bf16 matrix quantised row by row. The same seed on every rank gives the same weights.
    """
    device = torch.device(device)
    module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    fp8_layers = {name: m for name, m in module.named_modules() if isinstance(m, Fp8Linear)}
    fp8_params = {f"{name}.{leaf}" for name in fp8_layers for leaf in ("weight", "weight_scale")}
    with torch.no_grad():
        for layer in fp8_layers.values():
            full = torch.empty(layer.out_features, layer.in_features, dtype=torch.bfloat16, device=device)
            layer.fill(full.normal_(0.0, layer.in_features ** -0.5, generator=gen))
            del full
        for name, param in module.named_parameters():
            if name in fp8_params:
                continue
            full = torch.empty(param.shape, dtype=param.dtype, device=device)
            if param.ndim >= 2:
                full.normal_(0.0, math.prod(param.shape[1:]) ** -0.5, generator=gen)
            elif name.endswith("bias"):
                full.zero_()
            elif "norm" in name:
                full.fill_(1.0)
            else:
                full.normal_(0.0, 0.02, generator=gen)
            copy_full_into(param, full)
            del full
    for name, _ in module.named_buffers():
        raise RuntimeError(f"buffer {name} would be left uninitialised by to_empty; recompute it here")


def _target_dtype(
    name: str, tensor_dtype: torch.dtype, dtype: torch.dtype, fp32: Callable[[str], bool]
) -> torch.dtype:
    if not tensor_dtype.is_floating_point:
        return tensor_dtype
    return torch.float32 if fp32(name) else dtype


# ----------------------------------------------------------------------------- the DiT


def load_dit(
    cfg: DiTConfig,
    checkpoint: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    lora: str | Path | None = None,
) -> AvatarDiT:
    """Build the DiT on `meta`, fill it from an original/diffusers-layout checkpoint (+ LoRA merged)."""
    with torch.device("meta"):
        model = AvatarDiT(cfg)
    return fill_dit(model, checkpoint, lora, device, dtype)


def fill_dit(
    model: AvatarDiT,
    checkpoint: str | Path,
    lora: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> AvatarDiT:
    """Replace every DiT tensor, one at a time, from a checkpoint (+ LoRA merged).

    A parameter already materialised keeps its device and dtype; one on `meta` goes to `device`/`dtype`
    (default cpu/float32; modulation stays float32).
    """
    files = checkpoint_files(checkpoint)
    layout, rename = detect_renamer(files)
    current = model.state_dict()
    expected = checkpoint_shapes(model)
    ours_files = {rename(k): f for k, f in files.items()}
    source_name = {rename(k): k for k in files}
    if len(ours_files) != len(files):
        raise CheckpointError(
            f"checkpoint {checkpoint} ({layout} layout) has keys that map to the same parameter"
        )
    shapes = {rename(k): s for k, s in _shapes(files).items()}
    _check_fit(f"{checkpoint} ({layout} layout)", expected, shapes, source_name)
    edits = read_lora(lora, expected) if lora else LoraFile.empty()
    by_file: dict[Path, list[str]] = {}
    for ours, file in ours_files.items():
        by_file.setdefault(file, []).append(ours)
    for file, names in by_file.items():
        for name in names:
            place, cast = _placement(name, current[name], device, dtype, AvatarDiT.keeps_fp32)
            with safe_open(str(file), framework="pt", device=str(place)) as f:
                tensor = f.get_tensor(source_name[name])
            tensor = edits.apply(name, tensor.to(cast if tensor.dtype.is_floating_point else tensor.dtype))
            _assign(model, name, tensor)
    return model.eval()


def _placement(
    name: str,
    existing: torch.Tensor,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    fp32: Callable[[str], bool],
) -> tuple[torch.device, torch.dtype]:
    """Where a loaded tensor goes: the existing tensor's device/dtype, or the requested ones for `meta`."""
    if not existing.is_meta and device is None and dtype is None:
        return existing.device, existing.dtype
    place = (
        torch.device(device)
        if device is not None
        else (existing.device if not existing.is_meta else torch.device("cpu"))
    )
    wanted = dtype if dtype is not None else (existing.dtype if not existing.is_meta else torch.float32)
    return place, _target_dtype(name, existing.dtype, wanted, fp32)


def original_state_dict(model: AvatarDiT) -> dict[str, torch.Tensor]:
    """The model's weights under Wan2.2-S2V checkpoint names (to write the published layout)."""
    return {ours_to_original(k): v for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- the bundle


def save_bundle(path: str | Path, modules: dict[str, nn.Module], cfg: AppConfig) -> Path:
    """One safetensors file: each module's state dict under `name.`, the config as JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in modules.items():
        for key, tensor in module.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            if tensor.data_ptr() in seen and tensor.numel():  # safetensors refuses shared storage
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            tensors[f"{prefix}.{key}"] = tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": BUNDLE_FORMAT,
        "config": json.dumps(dataclasses.asdict(cfg)),
        "modules": ",".join(modules),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def bundle_config(path: str | Path) -> AppConfig:
    """The AppConfig a bundle was saved with (build the modules from it, then `load_bundle`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model bundle {path} does not exist (--model.checkpoint)")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(
            f"{path} is not a model bundle (metadata format {metadata.get('format')!r}, "
            f"expected {BUNDLE_FORMAT!r})"
        )
    return load_config_from_dict(json.loads(metadata["config"]))


def load_bundle(
    path: str | Path,
    modules: dict[str, nn.Module] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **named_modules: nn.Module,
) -> dict[str, nn.Module]:
    """Fill modules (as a dict or keywords; built normally or on `meta`) from a bundle, tensor by tensor.

    A materialised tensor keeps its device and dtype; `meta` ones go to `device`/`dtype` (cpu/float32).
    """
    modules = {**(modules or {}), **named_modules}
    path = Path(path)
    bundle_config(path)  # format check with a clear message
    keys = _safetensors_keys(path)
    current = {f"{p}.{k}": v for p, m in modules.items() for k, v in m.state_dict().items()}
    expected = {f"{p}.{k}": shape for p, m in modules.items() for k, shape in checkpoint_shapes(m).items()}
    in_file = {k: path for k in keys if k.split(".", 1)[0] in modules}
    shapes = _shapes(in_file)
    _check_fit(str(path), expected, shapes, {k: k for k in shapes})
    for key in in_file:
        prefix, name = key.split(".", 1)
        module = modules[prefix]
        fp32 = module.keeps_fp32 if isinstance(module, AvatarDiT) else (lambda _: False)
        place, cast = _placement(name, current[key], device, dtype, fp32)
        with safe_open(str(path), framework="pt", device=str(place)) as f:
            tensor = f.get_tensor(key)
        _assign(module, name, tensor.to(cast if tensor.dtype.is_floating_point else tensor.dtype))
    for module in modules.values():
        module.eval()
    return modules
