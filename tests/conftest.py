import pytest
import torch

from tiny import tiny_tokenizer


def _tiny(kind: str, layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(bos_token_id=None, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(bos_token_id=None, **common))
    return model.float().eval(), tok


@pytest.fixture(params=["llama", "qwen2"])
def tiny(request):
    """(model, tokenizer) of a 3-block random-weight Llama or Qwen2."""
    return _tiny(request.param)


@pytest.fixture
def tiny_llama():
    return _tiny("llama")


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny Llama saved as a local folder that `load_model` and the CLI can read."""
    model, tok = _tiny("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


CHATS = [
    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello friend, nice day"}],
    [{"role": "system", "content": "be kind"}, {"role": "user", "content": "a much longer question about many things ok"},
     {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a b c d e f g h i j k l m n o p"}],
]
