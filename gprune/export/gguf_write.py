"""Writing a GGUF file with ``gguf``'s writer: metadata, tensor types, atomic rename."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARCH = "deci"


def tensor_data(tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw ggml type or None) for one tensor in ``outtype``.

    1-D tensors (norms, biases) stay float32, as llama.cpp's converter writes them; q8_0
    needs rows (the input dimension) that are multiples of 32, others fall back to f16."""
    import gguf

    data = tensor.detach().float().contiguous().numpy()
    if outtype == "f32" or data.ndim == 1:
        return data, None
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, qtype), qtype
    return data.astype(np.float16), None


def file_type(outtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def add_metadata(writer, hp: dict, sizes: list, vocab: dict, outtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(file_type(outtype))
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length([s.n_ff for s in sizes])
    writer.add_head_count([s.n_head for s in sizes])
    writer.add_head_count_kv([s.n_head_kv for s in sizes])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(float(hp["rope_theta"]))
    if hp["rope_linear"]:
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp["rope_linear"]))
    writer.add_layer_norm_rms_eps(float(hp["eps"]))
    writer.add_vocab_size(hp["vocab"])
    add_tokenizer(writer, vocab)


def add_tokenizer(writer, vocab: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for kind, idx in vocab["special"].items():
        setters[kind](int(idx))
    writer.add_add_bos_token(bool(vocab["add_bos"]))
    writer.add_add_eos_token(bool(vocab["add_eos"]))
    if vocab.get("chat_template"):
        writer.add_chat_template(vocab["chat_template"])


def write_atomic(out: Path, hp: dict, sizes: list, tensors: list, vocab: dict,
                 outtype: str, name: str) -> Path:
    """Write to ``<out>.tmp-<pid>`` and rename; on any error the partial file is removed."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        add_metadata(writer, hp, sizes, vocab, outtype, name)
        for tname, tensor in tensors:
            data, raw = tensor_data(tensor, outtype)
            writer.add_tensor(tname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
