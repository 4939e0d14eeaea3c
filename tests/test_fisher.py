"""Output Fisher: equal to brute-force autograd on tiny models (GQA and padding included);
hooks removed, parameters untouched."""
from __future__ import annotations

import pytest
import torch

from gprune.maths.fisher import output_fisher
from gprune.models.adapters import adapter_for
from gprune.models.tiny import tiny_model


def brute_force(model, adapter, batches):
    """Retain every output projection's output; backprop the summed NLL; average grad^2."""
    layers = adapter.decoder_layers(model)
    sums = {(l, k): 0.0 for l in range(len(layers)) for k in ("mlp", "attn")}
    predicted = 0
    for ids, mask in batches:
        kept, handles = {}, []
        for l, layer in enumerate(layers):
            for kind, module in (("mlp", adapter.mlp_output(layer)),
                                 ("attn", adapter.attn_output(layer))):
                def keep(m, a, out, key=(l, kind)):
                    out.retain_grad()
                    kept[key] = out
                handles.append(module.register_forward_hook(keep))
        logits = model(input_ids=ids, attention_mask=mask).logits
        for h in handles:
            h.remove()
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        real = mask[:, 1:].bool()
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0][real].sum()
        nll.backward()
        predicted += int(real.sum())
        for key, out in kept.items():
            sums[key] = sums[key] + (out.grad.double() ** 2 * mask[..., None]).sum((0, 1))
        model.zero_grad(set_to_none=True)
    return {key: value / predicted for key, value in sums.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_output_fisher_equals_brute_force(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0                                       # a right-padded row
    batches = [(ids[:2], mask[:2]), (ids[2:], mask[2:])]
    flags = [p.requires_grad for p in model.parameters()]
    got = output_fisher(model, adapter, batches)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    want = brute_force(model, adapter, batches)
    for (layer, kind), value in want.items():
        assert got[layer][kind].shape == (adapter.mlp_output(
            adapter.decoder_layers(model)[0]).out_features,)
        torch.testing.assert_close(got[layer][kind], value, rtol=1e-5,
                                   atol=1e-7 * float(value.abs().max()))
        assert float(value.abs().max()) > 0
