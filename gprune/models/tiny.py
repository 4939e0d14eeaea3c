"""Tiny random-initialized models of every supported family, for tests and smoke runs.

``tiny:<family>`` is accepted wherever a model is named. The folder it
resolves to is a normal HF checkpoint (config, safetensors, a byte-level
tokenizer), so tiny models go through exactly the same loading path as real ones.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from gprune.errors import ConfigError
from gprune.models.adapters import ADAPTERS

VOCAB = 260  # 256 bytes + 4 specials
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", **_COMMON),
    "mistral": dict(model_type="mistral", sliding_window=None, **_COMMON),
    "qwen2": dict(model_type="qwen2", **_COMMON),  # q/k/v carry biases
    "qwen3": dict(model_type="qwen3", head_dim=16, **_COMMON),
    # Gemma 3's shape: 4 query heads on 1 KV head, sliding-window and full-attention
    # layers (a window shorter than the tests' sequences), tied embeddings
    "gemma3": dict(model_type="gemma3_text", head_dim=16, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   query_pre_attn_scalar=16,
                   **{**_COMMON, "num_key_value_heads": 1, "tie_word_embeddings": True}),
    "starcoder2": dict(model_type="starcoder2", use_bias=True, **_COMMON),
}
assert set(TINY_CONFIGS) == set(ADAPTERS), "every adapter needs a tiny config"


def tiny_config(family: str, **overrides):
    if family not in TINY_CONFIGS:
        raise ConfigError(f"no tiny model for family {family!r}; known: {', '.join(TINY_CONFIGS)}")
    kwargs = {**TINY_CONFIGS[family], **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random tiny CausalLM in float32, eval mode, with weights large enough to matter."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02)
    return model.eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with the tiny models' 260-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_folder_name(family: str) -> str:
    """``tiny-<family>-<digest of its config>``: a changed tiny config is a new folder, never
    a stale cached model under the old name."""
    spec = json.dumps(TINY_CONFIGS.get(family, {}), sort_keys=True, default=str)
    return f"tiny-{family}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def save_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny model of ``family`` as an HF folder (idempotent, atomic)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model = tiny_model(family, seed=seed)
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    tmp.replace(folder)
    return folder
