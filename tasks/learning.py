"""Inputs of the learning allocators (the path stage, the ``learned`` allocator): the dense
model and mixed-source calibration batches drawn from the corpora behind the stats."""
from __future__ import annotations

import torch

from artifacts.store import Artifact, ArtifactStore
from gprune.configs.allocate import AllocateConfig


def learning_inputs(config: AllocateConfig, store: ArtifactStore, stats: Artifact):
    """The dense model (on the configured device), its adapter and calibration batches;
    seeds torch so a learning run is reproducible."""
    from gprune.models.loader import load_model, resolve_device

    model, tokenizer, adapter = load_model(stats.extra["model_path"],
                                           device=resolve_device(config.device))
    torch.manual_seed(config.seed)
    return model, adapter, calibration_batches(store, stats, tokenizer, config)


def calibration_batches(store: ArtifactStore, stats: Artifact, tokenizer,
                        config: AllocateConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mixed-source calibration tokens: equal shares of every source behind the stats."""
    from gprune.data.corpus import sample_sequences
    from tasks.corpus import read_split

    ids, masks = [], []
    corpus_keys = [store.read(k, stage="capture").manifest["inputs"]["corpus"]
                   for k in stats.extra["capture_keys"]]
    per_source = max(1, config.n_sequences // len(corpus_keys))
    for i, corpus_key in enumerate(corpus_keys):
        texts = read_split(store, corpus_key, "calibration")
        source_ids, source_mask = sample_sequences(texts, tokenizer, per_source, config.seq_len,
                                                   seed=config.seed + 1000 + i)
        ids.append(source_ids)
        masks.append(source_mask)
    ids_all, mask_all = _pad_cat(ids, tokenizer.pad_token_id), _pad_cat(masks, 0)
    order = torch.randperm(len(ids_all), generator=torch.Generator().manual_seed(config.seed))
    ids_all, mask_all = ids_all[order], mask_all[order]
    return [(ids_all[i:i + config.batch_size], mask_all[i:i + config.batch_size])
            for i in range(0, len(ids_all), config.batch_size)]


def _pad_cat(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
                      for t in tensors])
