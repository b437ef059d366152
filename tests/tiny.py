"""Tiny random-weight chat models for tests: build in well under a second, no downloads.

`tiny_tokenizer()` is a character-level BPE with a chat template and special
role tokens; `multi_digit=True` adds merges so that "10", "100" and "85" are
single tokens (like Llama-3's tokenizer) while other numbers stay split into
digits (like Qwen's and SmolLM2's). `tiny_model(tokenizer)` is a 2-layer Llama.
`save_tiny(path)` writes both to a folder that `load_model(path)` can read.
"""

from __future__ import annotations

import string

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def tiny_tokenizer(multi_digit: bool = False, merges: list[tuple[str, str]] | None = None):
    """A character-level BPE tokenizer with our chat template; `merges` adds multi-character tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(string.digits + string.ascii_letters + string.punctuation))
    merges = list(merges or []) + ([("1", "0"), ("10", "0"), ("8", "5")] if multi_digit else [])
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + ["".join(m) for m in merges])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    # Split words and punctuation at whitespace; digits stay together so merges can apply.
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
                                  additional_special_tokens=SPECIALS[3:])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_model(tokenizer, seed: int = 0, layers: int = 2, sharpness: float = 8.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    # Larger output weights than the default init make the next-token distributions peaked,
    # so scores and masses are not all the same.
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model.float()


def save_tiny(path, multi_digit: bool = False, seed: int = 0):
    tok = tiny_tokenizer(multi_digit)
    model = tiny_model(tok, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
