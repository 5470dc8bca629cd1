"""Tiny models for the OPCD tests and benchmarks: a randomly initialised 2-layer Llama with a real chat tokenizer."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

PREFIXES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name a red fruit."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "How many legs does a dog have?"}],
    [
        {"role": "user", "content": "Let's play a game."},
        {"role": "assistant", "content": "Sure, which one?"},
        {"role": "user", "content": "Guess my number between 1 and 3."},
    ],
    [{"role": "user", "content": "What colour is the sky?"}],
    [{"role": "user", "content": "Say something nice."}],
]

EXPERIENCE = [["Always answer in French.", "Count on your fingers."], ["Be brief: one word."]]
"""Two experience sets for tests on tiny models (one is drawn per sample)."""

_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _default_model_dir() -> Path | None:
    from oel.model.prepare import default_model_dir
    from oel.settings import load_settings

    path = default_model_dir(load_settings())
    return path if (path / "tokenizer.json").is_file() else None


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """The default model's tokenizer when it is prepared; otherwise a small byte-level BPE trained here."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = _default_model_dir()
    if path is not None:
        return AutoTokenizer.from_pretrained(str(path))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [m["content"] for conv in PREFIXES for m in conv] * 5 + ["the a of and to in is you that it"] * 5
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def tiny_model(tokenizer, dtype: torch.dtype = torch.float32, seed: int = 0, init_range: float = 0.2):
    """A 2-layer Llama with hidden size 32 over the tokenizer's vocabulary, randomly initialised.

    ``init_range`` (the weights' standard deviation) is larger than usual so that the next-token
    distributions are peaked and a context change moves them measurably."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=bos,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        initializer_range=init_range,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    return model


def save_tiny_model(path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny model folder (weights, config, tokenizer with chat template), like any HF model folder."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, dtype)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
