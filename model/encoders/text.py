"""The prompt encoder: umT5 (transformers `UMT5EncoderModel`), run once per prompt and cached.

Wan pads the text context to `text_len` with zero rows (the DiT sees padding as zeros, not as the
encoder's output for pad tokens); we do the same. The tiny model uses a byte-level tokenizer defined
here, so tests need no tokenizer files; real checkpoints load the umT5 tokenizer from a local folder.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from model.config import TextEncoderConfig

BYTE_TOKENIZER = "bytes"
PAD_ID, EOS_ID = 0, 1  # T5 conventions
_BYTE_OFFSET = 3  # ids 0..2 are pad, eos, unk; byte b is id b + 3
_CACHED_PROMPTS = 16


class Tokenizer(Protocol):
    """Text -> (ids [1, text_len], mask [1, text_len]), padded or truncated to text_len."""

    def __call__(self, text: str, text_len: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def clean_prompt(text: str) -> str:
    """Collapse runs of whitespace, as Wan's tokenizer wrapper does (`clean='whitespace'`)."""
    return re.sub(r"\s+", " ", text).strip()


class ByteTokenizer:
    """UTF-8 bytes as token ids (+3), EOS at the end: deterministic, no files, 259 ids."""

    vocab_size = 256 + _BYTE_OFFSET

    def __call__(self, text: str, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [b + _BYTE_OFFSET for b in clean_prompt(text).encode("utf-8")][: text_len - 1] + [EOS_ID]
        mask = [1] * len(ids) + [0] * (text_len - len(ids))
        ids += [PAD_ID] * (text_len - len(ids))
        return torch.tensor([ids]), torch.tensor([mask])


class PretrainedTokenizer:
    """The umT5 tokenizer of a checkpoint folder (e.g. `google/umt5-xxl` in the Wan layout), local files only."""

    def __init__(self, folder: str | Path) -> None:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"no tokenizer folder at {folder}; set --model.text_encoder.tokenizer to the "
                                    f"umT5 tokenizer folder (absolute, or relative to model.checkpoint) or 'bytes'")
        self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.vocab_size = len(self._tokenizer)

    def __call__(self, text: str, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._tokenizer([clean_prompt(text)], padding="max_length", truncation=True, max_length=text_len,
                              add_special_tokens=True, return_tensors="pt")
        return out.input_ids, out.attention_mask


def umt5_config(cfg: TextEncoderConfig) -> UMT5Config:
    """umT5 encoder config at cfg's size (umT5-XXL defaults otherwise: gated-GELU FFN, 32 relative buckets)."""
    return UMT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                      num_layers=cfg.num_layers, num_heads=cfg.num_heads, feed_forward_proj="gated-gelu",
                      dropout_rate=0.0, is_encoder_decoder=False)


def make_tokenizer(cfg: TextEncoderConfig, checkpoint_dir: str | Path | None) -> Tokenizer:
    """'bytes' -> ByteTokenizer; otherwise a folder, relative paths taken inside the checkpoint folder."""
    if cfg.tokenizer == BYTE_TOKENIZER:
        if cfg.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"the byte tokenizer needs model.text_encoder.vocab_size >= {ByteTokenizer.vocab_size}, "
                             f"got {cfg.vocab_size}")
        return ByteTokenizer()
    folder = Path(cfg.tokenizer)
    if not folder.is_absolute() and checkpoint_dir is not None:
        folder = Path(checkpoint_dir) / folder
    return PretrainedTokenizer(folder)


class TextEncoder:
    """Shared umT5 weights + tokenizer; `encode(prompt)` -> [1, text_len, d_model], cached per prompt."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: Tokenizer, text_len: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoder_calls = 0

    @classmethod
    def build(cls, cfg: TextEncoderConfig, checkpoint_dir: str | Path | None = None) -> TextEncoder:
        """Random weights of the configured size; load real weights into `.model` afterwards."""
        return cls(UMT5EncoderModel(umt5_config(cfg)), make_tokenizer(cfg, checkpoint_dir), cfg.text_len)

    @torch.inference_mode()
    def encode(self, prompt: str) -> torch.Tensor:
        """Context for the DiT's cross-attention; the same prompt returns the same (cached) tensor."""
        key = clean_prompt(prompt)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        ids, mask = self.tokenizer(key, self.text_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        context = hidden * mask[..., None].to(hidden.dtype)  # pad rows are zeros, as Wan pads the context
        self.encoder_calls += 1
        self._cache[key] = context
        if len(self._cache) > _CACHED_PROMPTS:
            self._cache.popitem(last=False)
        return context
