"""LiveAvatar LoRA files, applied to the DiT's weights as LiveAvatar's loader applies them.

LiveAvatar (`causal_s2v_pipeline_tpp.py` `add_lora_to_model`, called with load_lora_weight_only=False from
`minimal_inference/s2v_streaming_interact.py`) wraps the DiT with peft (LoraConfig r=128, lora_alpha=64,
target_modules "q,k,v,o,ffn.0,ffn.2"), prefixes the file's keys with `base_model.model.` unless its FIRST key
has that prefix, loads them with `load_state_dict(strict=False)` and then `merge_and_unload()`s. So:

1. a full tensor whose key names a tensor of the wrapped model replaces that base weight: a LoRA-target
   layer's weight is `<layer>.base_layer.weight` there (its plain `<layer>.weight` names nothing and is
   skipped), every other tensor keeps its own name (`casual_audio_encoder.weights`, `blocks.0.norm3.weight`);
2. then each lora_A/lora_B pair is merged into its (possibly replaced) weight: W += alpha / rank * B @ A;
3. keys that name nothing are skipped (logged once here, with their count); a size mismatch is an error.

Pairs are read leniently beyond that (with or without peft's adapter name `.default`, with a
`diffusion_model.` prefix, or in our own names); a file in which nothing fits the model is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from model.weights.hub import resolve_lora
from model.weights.names import SHOW_KEYS, CheckpointError, original_to_ours

log = logging.getLogger(__name__)

# LiveAvatar's LoRA hyper-parameters (liveavatar/configs/s2v_causal_sft.yaml: lora_rank 128, lora_alpha 64,
# lora_target_modules "q,k,v,o,ffn.0,ffn.2"); the rank comes from the tensors, alpha from the file if set.
LIVEAVATAR_LORA_ALPHA = 64.0
LIVEAVATAR_LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")  # peft matches them as name suffixes
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_BASE_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<leaf>weight|bias)$")


@dataclasses.dataclass(frozen=True)
class LoraPair:
    """One low-rank update W += scale * up @ down for the parameter `target` (our naming)."""

    target: str
    down: torch.Tensor  # lora_A [r, in]
    up: torch.Tensor  # lora_B [out, r]
    scale: float


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """What one LoRA file does to the DiT's tensors (our names): replace some, then merge pairs into some."""

    replacements: dict[str, torch.Tensor]
    pairs: dict[str, LoraPair]

    @classmethod
    def empty(cls) -> LoraFile:
        return cls({}, {})

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor `name` after the file: its replacement (in `tensor`'s device and dtype), then + B@A."""
        if name in self.replacements:
            tensor = self.replacements[name].to(tensor.device, tensor.dtype)
        if name in self.pairs:
            tensor = merge_lora(tensor, self.pairs[name])
        return tensor


def is_lora_target(wan_module: str) -> bool:
    """Whether peft wraps this module (Wan name) for LiveAvatar's target list (suffix match, as peft)."""
    return any(wan_module == t or wan_module.endswith("." + t) for t in LIVEAVATAR_LORA_TARGETS)


def read_lora(path: str | Path, model_shapes: dict[str, torch.Size], alpha: float | None = None) -> LoraFile:
    """Read a LoRA file (a path, a folder, or a hub id such as Quark-Vision/Live-Avatar in the local hub cache)
    against the model's tensor names and shapes (ours); see the module docstring.

    alpha comes from `alpha`, else the file's metadata `lora_alpha`, else `adapter_config.json` beside it,
    else LiveAvatar's 64.
    """
    path = resolve_lora(str(path))  # a file, a folder holding one, or a hub id in the local cache
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if alpha is None:
        alpha = _lora_alpha(path, metadata)
    prefixed = bool(raw) and next(iter(raw)).startswith(PEFT_PREFIX)  # the reference looks at the first key
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    replacements: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in raw.items():
        match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX).removeprefix("diffusion_model."))
        if match:
            (downs if match["which"] == "A" else ups)[match["module"]] = tensor
            continue
        target = _full_tensor_target(key if prefixed else PEFT_PREFIX + key, model_shapes)
        if target is None:
            ignored.append(key)
            continue
        if tuple(tensor.shape) != tuple(model_shapes[target]):
            raise CheckpointError(f"LoRA file {path}: {key} is {list(tensor.shape)}, the model's {target} is "
                                  f"{list(model_shapes[target])} (a LoRA for another model size?)")
        replacements[target] = tensor
    pairs, unknown = _pairs(downs, ups, model_shapes, alpha)
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired or not (pairs or replacements):
        lines = [f"LoRA file {path} does not fit the model:"]
        if unpaired:
            lines.append(f"  lora_A without lora_B (or the reverse) for: {unpaired[:SHOW_KEYS]}")
        if unknown:
            lines.append(f"  {len(unknown)} LoRA targets name no model layer, first: {unknown[:SHOW_KEYS]}")
        if not (pairs or replacements or unknown):
            lines.append(f"  no lora_A/lora_B tensors and no tensor of the model among {len(raw)} keys, "
                         f"first: {list(raw)[:SHOW_KEYS]}")
        raise CheckpointError("\n".join(lines))
    ignored += [f"{m}.lora_A/B" for m in unknown]
    if ignored:
        log.warning("LoRA file %s: %d keys name no tensor of the model and are skipped (as LiveAvatar's "
                    "load_state_dict(strict=False)), first: %s", path, len(ignored), ignored[:SHOW_KEYS])
    scales = sorted({p.scale for p in pairs.values()})
    log.info("LoRA file %s: %d full tensors replace base weights, %d LoRA pairs merged (alpha/rank %s)",
             path, len(replacements), len(pairs), ", ".join(f"{s:g}" for s in scales) or "-")
    return LoraFile(replacements, pairs)


def _full_tensor_target(key: str, model_shapes: dict[str, torch.Size]) -> str | None:
    """Our name of the tensor a non-LoRA key loads into in the peft-wrapped model, or None (skipped)."""
    if not key.startswith(PEFT_PREFIX):
        return None
    name = key.removeprefix(PEFT_PREFIX)
    base = _BASE_LAYER.match(name)
    if base:  # a wrapped layer's own weight/bias
        if not is_lora_target(base["module"]):
            return None
        name = f"{base['module']}.{base['leaf']}"
    elif is_lora_target(name.rsplit(".", 1)[0]):
        return None  # the wrapped layer's plain name: peft moved it under base_layer
    ours = original_to_ours(name)
    return ours if ours in model_shapes else None


def _pairs(downs: dict[str, torch.Tensor], ups: dict[str, torch.Tensor], model_shapes: dict[str, torch.Size],
           alpha: float) -> tuple[dict[str, LoraPair], list[str]]:
    """The pairs whose module names a model layer (by our name), and the module names that name none."""
    pairs, unknown = {}, []
    for module_name in sorted(set(downs) & set(ups)):
        weight = module_name + ".weight"
        target = weight if weight in model_shapes else original_to_ours(weight)
        if target not in model_shapes:
            unknown.append(module_name)
            continue
        down = downs[module_name]
        pairs[target] = LoraPair(target, down, ups[module_name], alpha / down.shape[0])
    return pairs, unknown


def _lora_alpha(path: Path, metadata: dict[str, str]) -> float:
    if "lora_alpha" in metadata:
        return float(metadata["lora_alpha"])
    config = path.parent / "adapter_config.json"
    if config.is_file():
        return float(json.loads(config.read_text()).get("lora_alpha", LIVEAVATAR_LORA_ALPHA))
    return LIVEAVATAR_LORA_ALPHA


def merge_lora(weight: torch.Tensor, pair: LoraPair) -> torch.Tensor:
    """W + alpha/rank * B @ A, computed in float32 on W's device, returned in W's dtype."""
    if tuple(weight.shape) != (pair.up.shape[0], pair.down.shape[1]):
        raise CheckpointError(
            f"LoRA for {pair.target}: B@A is {pair.up.shape[0]}x{pair.down.shape[1]}, "
            f"the weight is {list(weight.shape)}"
        )
    up = pair.up.to(weight.device, torch.float32)
    down = pair.down.to(weight.device, torch.float32)
    return (weight.float() + pair.scale * (up @ down)).to(weight.dtype)
