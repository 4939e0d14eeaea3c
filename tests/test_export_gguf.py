"""GGUF export: a pruned tiny Llama (a layer without attention, different MLP widths, GQA,
output biases from bias compensation) and its dense source give the same logits in
llama.cpp (llama-cpp-python, a locked dependency) as in transformers; bad input fails in
one line and leaves no file."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from gprune.cli import main
from gprune.errors import ConfigError
from gprune.export.tokenizer import pre_tokenizer_name
from gprune.maths.gguf_layout import interleave_order, pad_mlp
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.maths.surgery import apply_plan, bias_fits
from gprune.models.adapters import adapter_for
from gprune.models.pruned import finalize, save_pruned
from gprune.models.tiny import save_tiny_model, tiny_model

from tests.test_surgery import random_means

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
VOCAB = 256 + 4 + len(MERGES)
REL_TOL = 1e-3
IDS = [5, 260, 72, 261, 262, 33, 104, 101, 0, 255, 262, 97, 32, 7]


def merges_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with three merges (llama.cpp's gpt2 tokenizer needs merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    vocab.update({a + b: 260 + i for i, (a, b) in enumerate(MERGES)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_plan(shape) -> PruningPlan:
    """Layer 0: no attention; 1: every head (GQA 2:1); 2: one KV group (2 heads sharing
    it) and no MLP channel left; 3: no attention, full MLP. Four different MLP widths."""
    rows = [(range(0, 96, 2), []), (range(60), [0, 1, 2, 3]), ([], [2, 3]), (range(96), [])]
    layers = tuple(LayerPlan.from_heads(i, list(mlp), heads, shape)
                   for i, (mlp, heads) in enumerate(rows))
    return PruningPlan("fp", "llama", "test", 0.5, shape, layers)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(dense folder, pruned folder): tiny Llamas with the merges tokenizer; the pruned one
    is sliced with bias compensation, so its output projections carry biases."""
    root = tmp_path_factory.mktemp("gguf")
    dense = tiny_model("llama", num_hidden_layers=4, vocab_size=VOCAB, rope_theta=5000.0)
    dense.save_pretrained(root / "dense")
    merges_tokenizer().save_pretrained(root / "dense")
    adapter = adapter_for(dense.config)
    shape = adapter.shape(dense.config)
    pruned = copy.deepcopy(dense)
    finalize(pruned, adapter, apply_plan(pruned, adapter, tiny_plan(shape),
                                         bias_fits(random_means(shape))))
    save_pruned(pruned, merges_tokenizer(), root / "pruned", {"method": "test"})
    return root / "dense", root / "pruned"


def hf_logits(folder, ids) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def llama_cpp_model(path):
    from llama_cpp import Llama   # a locked dependency: the test fails without it

    return Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                 n_threads=2, type_k=0, type_v=0)   # f32 KV cache (ggml type 0)


def llama_cpp_logits(path, ids) -> np.ndarray:
    llm = llama_cpp_model(path)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def export(folder, out, outtype="f32") -> int:
    return main(["export", "gguf", str(folder), "--outtype", outtype, "-o", str(out)])


@pytest.mark.parametrize("which", ["pruned", "dense"])
def test_f32_export_matches_transformers_logits(checkpoints, which, tmp_path):
    folder = checkpoints[1] if which == "pruned" else checkpoints[0]
    out = tmp_path / f"{which}.gguf"
    assert export(folder, out) == 0
    ref, got = hf_logits(folder, IDS), llama_cpp_logits(out, IDS)
    assert got.shape == ref.shape
    rel = np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert rel.max() < REL_TOL, f"relative logit error {rel.max():.2e}"
    assert np.abs(ref).max() > 0.1   # logits large enough for the comparison to mean something


def test_pruned_gguf_carries_per_layer_shapes_and_biases(checkpoints, tmp_path):
    import gguf

    out = tmp_path / "pruned.gguf"
    assert export(checkpoints[1], out) == 0
    reader = gguf.GGUFReader(out)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.architecture"] == "deci"
    assert fields["deci.feed_forward_length"] == [48, 60, 1, 96]   # layer 2: one zero channel
    assert fields["deci.attention.head_count"] == [1, 4, 2, 0]      # layer 0: one zero head
    assert fields["deci.attention.head_count_kv"] == [1, 2, 1, 0]
    names = {t.name for t in reader.tensors}
    # refit projections that lost columns carry a bias; those that kept every column (layer
    # 1's attention, layer 3's MLP) keep their dense weights and get none
    assert {"blk.0.attn_output.bias", "blk.2.attn_output.bias", "blk.2.ffn_down.bias"} <= names
    assert not {"blk.1.attn_output.bias", "blk.3.ffn_down.bias"} & names
    assert "blk.3.attn_output.bias" not in names   # folded into blk.2.ffn_down.bias
    assert fields["tokenizer.ggml.pre"] == "gpt-2"


def test_tokenizer_round_trip(checkpoints, tmp_path):
    out = tmp_path / "dense.gguf"
    assert export(checkpoints[0], out) == 0
    text = "the theme: then 42 other things"
    expected = AutoTokenizer.from_pretrained(checkpoints[0])(text)["input_ids"]
    assert any(i >= 260 for i in expected)          # the merges are used
    assert llama_cpp_model(out).tokenize(text.encode(), add_bos=False, special=True) == expected


def test_byte_tokenizer_without_merges_round_trips(tmp_path):
    """The tiny models' byte tokenizer has no merges; the one written (which can never
    apply) must leave llama.cpp's tokenization equal to HF's."""
    folder = save_tiny_model("llama", tmp_path / "tiny")
    out = tmp_path / "tiny.gguf"
    assert export(folder, out) == 0
    text = "byte by byte: 42 \u00e9t\u00e9 <s>"
    expected = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    assert llama_cpp_model(out).tokenize(text.encode(), add_bos=False, special=True) == expected


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) \
        == "smollm"
    with pytest.raises(ConfigError, match="no llama.cpp"):
        pre_tokenizer_name({"type": "Metaspace"})


def test_q8_0_pads_mlp_widths_and_loads(checkpoints, tmp_path):
    import gguf

    out = tmp_path / "pruned-q8.gguf"
    assert export(checkpoints[1], out, "q8_0") == 0
    fields = {n: f.contents() for n, f in gguf.GGUFReader(out).fields.items()}
    assert fields["deci.feed_forward_length"] == [64, 64, 1, 96]
    got, ref = llama_cpp_logits(out, IDS), hf_logits(checkpoints[1], IDS)
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() > 0.7


def test_zero_padding_and_rope_order_are_exact():
    gate, up, down = torch.randn(5, 8), torch.randn(5, 8), torch.randn(8, 5)
    x = torch.randn(3, 8)
    mlp = lambda g, u, d: (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T  # noqa: E731
    assert torch.allclose(mlp(gate, up, down), mlp(*pad_mlp(gate, up, down, 32)))
    assert interleave_order(6).tolist() == [0, 3, 1, 4, 2, 5]


# ---- bad input: one line on stderr, exit 2, no file left ----------------------------
def assert_refused(capsys, out, code, *words):
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not list(out.parent.glob(out.name + "*"))


def test_unsupported_family_refused(tmp_path, capsys):
    folder = save_tiny_model("qwen2", tmp_path / "qwen2")
    capsys.readouterr()   # saving prints a progress bar
    out = tmp_path / "out" / "q.gguf"
    assert_refused(capsys, out, export(folder, out), "Llama family", "qwen2")


def test_non_gprune_checkpoints_refused(checkpoints, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert_refused(capsys, out, export(tmp_path, out), "not a gprune checkpoint")
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((checkpoints[1] / "config.json").read_text())
    del config["gprune_layers"]
    (other / "config.json").write_text(json.dumps(config))
    assert_refused(capsys, out, export(other, out), "not a gprune checkpoint")


def test_bad_outtype_refused(checkpoints, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert_refused(capsys, out, export(checkpoints[1], out, "q4_k"), "f32, f16, q8_0")


def test_failed_write_leaves_no_file(checkpoints, tmp_path, capsys, monkeypatch):
    import gguf

    def fail(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    out = tmp_path / "x.gguf"
    with pytest.raises(OSError, match="disk full"):
        export(checkpoints[1], out)
    assert list(tmp_path.iterdir()) == []
