"""Every family's adapter finds every projection of a tiny random model, with the right sizes."""
import pytest
from transformers import AutoConfig

from gprune.errors import ConfigError
from gprune.models.adapters import adapter_for
from gprune.models.tiny import tiny_model


def test_adapter_finds_every_projection(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    shape = adapter.shape(model.config)
    kv_heads = 1 if family == "gemma3" else 2    # Gemma 3: 4 heads on 1 KV head; else 2 per group
    assert (shape.heads, shape.kv_heads, shape.head_dim) == (4, kv_heads, 16)
    layers = adapter.decoder_layers(model)
    assert len(layers) == shape.num_layers == 3
    for layer in layers:
        ins = adapter.mlp_inputs(layer)
        assert len(ins) == (2 if shape.gated else 1)
        assert all(p.weight.shape == (shape.intermediate, shape.hidden) for p in ins)
        assert adapter.mlp_output(layer).weight.shape == (shape.hidden, shape.intermediate)
        q, k, v = adapter.attn_qkv(layer)
        assert q.weight.shape == (shape.heads * shape.head_dim, shape.hidden)
        assert k.weight.shape == v.weight.shape == (shape.kv_heads * shape.head_dim, shape.hidden)
        assert adapter.attn_output(layer).weight.shape == (shape.hidden, shape.heads * shape.head_dim)
    names = {name for name, _ in model.named_parameters() if name.endswith("weight") and ".layers." in name}
    found = {id(m.weight) for layer in layers for m in
             [*adapter.mlp_inputs(layer), adapter.mlp_output(layer), *adapter.attn_qkv(layer),
              adapter.attn_output(layer)]}
    projections = {id(p) for n, p in model.named_parameters() if n in names and p.dim() == 2}
    assert projections == found                       # no 2-D layer weight is left unaccounted


def test_unknown_family_names_the_supported_ones():
    config = AutoConfig.for_model("gpt2")
    with pytest.raises(ConfigError, match="supported model types: .*llama"):
        adapter_for(config)
