"""A tiny random-weight Llama, made at test time: no model hub can be reached here.

The tokenizer is trained from scratch with `tokenizers` (byte-level BPE on a few sentences),
the config is transformers' own `LlamaConfig`, and the weights are random tensors written
with safetensors, so making one takes well under a second and needs no torch.
Sizes: head_dim 64 (hidden 128, 2 heads), because vLLM's CPU attention kernels reject
smaller heads such as 16; 2 layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HIDDEN = 128
HEADS = 2
LAYERS = 2
INTERMEDIATE = 256
MAX_POSITIONS = 1024
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# A plain template, so that /v1/chat/completions has one to render.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
CORPUS = [
    "berth serves models on GPU nodes the way PAI-EAS does.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello World! How are you today? Say hello to the assistant.",
    "user: write a haiku about containers\nassistant: ships of code at rest",
    "0123456789 +-*/=()[]{}<>.,;:!?'\" abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def _tokenizer(target: Path) -> int:
    """Train a byte-level BPE tokenizer and save it in transformers' layout; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[BOS, EOS, PAD], initial_alphabet=_ascii_alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(target))
    # Spelled so that any transformers release reads it, the image's as well as this one's.
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE, model_max_length=MAX_POSITIONS)
    config_path.write_text(json.dumps(config, indent=2))
    return tokenizer.get_vocab_size()


def _ascii_alphabet() -> list[str]:
    """The byte-level alphabet's characters for bytes 0-127 (GPT-2's byte-to-unicode table).

    Every token then decodes to whole characters. With all 256 bytes, random weights often
    emit a lone UTF-8 lead or continuation byte, which vLLM's detokenizer holds back until the
    character is whole: the client then sees tokens late and in bunches that vLLM's own
    histograms (timed per token, before detokenizing) do not, and the two cannot be compared."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}
    return [table[b] for b in range(128)]


def _weights(vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": matrix(vocab, HIDDEN), "model.norm.weight": np.ones(HIDDEN, np.float32)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{name}.weight"] = matrix(HIDDEN, HIDDEN)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = matrix(INTERMEDIATE, HIDDEN)
        tensors[f"{prefix}.mlp.up_proj.weight"] = matrix(INTERMEDIATE, HIDDEN)
        tensors[f"{prefix}.mlp.down_proj.weight"] = matrix(HIDDEN, INTERMEDIATE)
        tensors[f"{prefix}.input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    tensors["lm_head.weight"] = matrix(vocab, HIDDEN)
    return tensors


def make_tiny_llama(target: Path, seed: int = 0) -> Path:
    """Write config, tokenizer and random weights of a 2-layer Llama into `target`."""
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    target.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(target)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        # The special tokens come first in the trained vocabulary.
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(target))
    # Older transformers (the vLLM image's may be one) read these names.
    config_path = target / "config.json"
    config_dict = json.loads(config_path.read_text())
    config_dict.update(torch_dtype="float32", rope_theta=10000.0)
    config_path.write_text(json.dumps(config_dict, indent=2))
    save_file(_weights(vocab, seed), str(target / "model.safetensors"), metadata={"format": "pt"})
    return target
