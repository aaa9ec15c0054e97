"""umT5 prompt encoder: shape, zero padding, per-prompt cache, and the file-free byte tokenizer."""
from __future__ import annotations

import pytest
import torch

from model.config import load_config
from model.encoders.text import EOS_ID, PAD_ID, ByteTokenizer, TextEncoder, make_tokenizer


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder.build(load_config(None).model.text_encoder)


def test_context_is_text_len_rows_of_d_model_with_zero_padding(encoder):
    context = encoder.encode("hi")
    assert context.shape == (1, 16, 64) and context.dtype == torch.float32
    assert context[0, :3].abs().sum(-1).gt(0).all()  # 'h', 'i', EOS
    assert torch.all(context[0, 3:] == 0)


def test_same_prompt_is_encoded_once_and_returns_the_cached_tensor(encoder):
    calls = encoder.encoder_calls
    first = encoder.encode("A person talking to the camera.")
    second = encoder.encode("A person  talking to the camera. ")  # same after whitespace cleaning
    assert second is first
    assert encoder.encoder_calls == calls + 1
    assert not torch.equal(encoder.encode("Someone else entirely"), first)


def test_byte_tokenizer_truncates_keeps_eos_and_pads():
    ids, mask = ByteTokenizer()("abcdefghijklmnopqrstuvwxyz", 8)
    assert ids.shape == mask.shape == (1, 8)
    assert ids[0, :7].tolist() == [ord(c) + 3 for c in "abcdefg"] and ids[0, 7] == EOS_ID
    assert mask.sum() == 8
    ids, mask = ByteTokenizer()("é", 8)  # two UTF-8 bytes
    assert ids[0, :3].tolist() == [0xC3 + 3, 0xA9 + 3, EOS_ID] and ids[0, 3:].eq(PAD_ID).all()
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_missing_tokenizer_folder_says_which_setting_to_fix(tmp_path):
    cfg = load_config("configs/liveavatar_14b.yaml").model.text_encoder
    with pytest.raises(FileNotFoundError, match="model.text_encoder.tokenizer"):
        make_tokenizer(cfg, tmp_path)


def test_tokenizer_folder_inside_the_checkpoint_is_loaded_from_local_files(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "▁abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "google" / "umt5-xxl")
    cfg = load_config("configs/liveavatar_14b.yaml").model.text_encoder
    ids, mask = make_tokenizer(cfg, tmp_path)("hello  world", 16)
    assert ids.shape == (1, 16)
    assert ids[0, mask[0].sum() - 1] == EOS_ID and ids[0, mask[0].sum():].eq(PAD_ID).all()
