"""Inputs of the learning allocators (the path stage, the ``learned`` allocator): the dense
model and mixed-source calibration batches drawn from the corpora behind the stats."""
from __future__ import annotations

import threading

import torch

from artifacts.store import Artifact, ArtifactStore
from gprune.configs.allocate import AllocateConfig


def dense_model(config: AllocateConfig, stats: Artifact):
    """(model, tokenizer, adapter) of the stats' dense model on the configured device;
    seeds torch so a learning run is reproducible."""
    from gprune.models.loader import load_model, resolve_device

    loaded = load_model(stats.extra["model_path"], device=resolve_device(config.device))
    torch.manual_seed(config.seed)
    return loaded


def learning_inputs(config: AllocateConfig, store: ArtifactStore, stats: Artifact):
    """The dense model (on the configured device; a layer-streamed ``StreamedModel`` when
    ``config.stream`` decides so), its adapter and calibration batches."""
    streamed = _streamed(config, stats)
    if streamed is not None:
        source, tokenizer = streamed
        torch.manual_seed(config.seed)
        return source, source.adapter, calibration_batches(store, stats, tokenizer, config)
    model, tokenizer, adapter = dense_model(config, stats)
    return model, adapter, calibration_batches(store, stats, tokenizer, config)


def _streamed(config: AllocateConfig, stats: Artifact):
    """(``StreamedModel``, tokenizer) of the stats' dense model when ``config.stream``
    decides to stream it (a one-line error when even one layer does not fit), else None."""
    from pathlib import Path

    from gprune.models.loader import load_tokenizer, resolve_device
    from gprune.models.streamed import streamed_source

    path = Path(stats.extra["model_path"])
    source = streamed_source(path, resolve_device(config.device), config.stream,
                             config.batch_size * config.seq_len)
    return None if source is None else (source, load_tokenizer(path))


_CHECKS: dict[tuple, tuple] = {}    # batch settings -> (model or None, batches, teacher)
_CHECKS_LOCK = threading.Lock()


def check_inputs(config: AllocateConfig, store: ArtifactStore, stats: Artifact):
    """``learning_inputs`` of the allocate stage's kl_check (or of its refinement: any
    batch settings) plus the dense model's teacher on its batches
    (``gprune.maths.plan_check.dense_teacher``). The batches and the teacher depend only on
    the stats and the batch settings, so the targets of one sweep share them: the sets of
    the last model are kept in this process (the dense final hidden states, and as many of
    the dense side's KL terms as half a memo's budget holds, a quarter for a second set),
    and with them the dense model itself (read only: the check prunes copies) when it is no
    larger than a memo's budget."""
    from artifacts.memo import default_budget, nbytes
    from gprune.maths.plan_check import dense_teacher
    from gprune.models.loader import resolve_device

    model_key = (str(store.root.resolve()), stats.key, resolve_device(config.device))
    key = (*model_key, config.n_sequences, config.seq_len, config.batch_size, config.seed)
    with _CHECKS_LOCK:                  # concurrent targets wait for one teacher
        if key not in _CHECKS:
            if any(other[:3] != model_key for other in _CHECKS):
                _CHECKS.clear()
            kept = next((entry[0] for entry in _CHECKS.values()), None)
            model, tokenizer, adapter = kept or dense_model(config, stats)
            torch.manual_seed(config.seed)
            batches = check_batches(store, stats, tokenizer, config)
            teacher = dense_teacher(model, batches,    # half a budget, a quarter with two
                                    keep_bytes=default_budget() // (4 if _CHECKS else 2))
            small = nbytes(list(model.parameters())) <= default_budget()
            _CHECKS[key] = ((model, tokenizer, adapter) if small else None, batches, teacher)
            return model, adapter, batches, teacher
        kept, batches, teacher = _CHECKS[key]
    if kept is None:                    # too large to keep: loaded again (and seeded)
        kept = dense_model(config, stats)
    else:
        torch.manual_seed(config.seed)  # as a fresh load leaves it
    return kept[0], kept[2], batches, teacher


def streamed_check_inputs(config: AllocateConfig, store: ArtifactStore, stats: Artifact):
    """(``StreamedModel`` of the dense model, kl_check batches) when ``config.stream``
    decides to stream it (a one-line error when even one layer does not fit), else None."""
    streamed = _streamed(config, stats)
    if streamed is None:
        return None
    source, tokenizer = streamed
    return source, check_batches(store, stats, tokenizer, config)


def check_batches(store: ArtifactStore, stats: Artifact, tokenizer,
                  config: AllocateConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The kl_check's calibration tokens, sources interleaved (the first sequence of every
    source, then the second of every source, ...): each round of the sequential check
    (``gprune.maths.plan_check``) sees every source once."""
    sequences = source_sequences(store, stats, tokenizer, config)
    counts = [len(ids) for ids, _ in sequences]
    starts = [sum(counts[:s]) for s in range(len(counts))]
    order = torch.tensor([start + i for i in range(max(counts))
                          for start, count in zip(starts, counts) if i < count])
    return _batched_in(sequences, order, tokenizer.pad_token_id, config.batch_size)


def calibration_batches(store: ArtifactStore, stats: Artifact, tokenizer,
                        config: AllocateConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mixed-source calibration tokens: equal shares of every source behind the stats."""
    sequences = source_sequences(store, stats, tokenizer, config)
    order = torch.randperm(sum(len(ids) for ids, _ in sequences),
                           generator=torch.Generator().manual_seed(config.seed))
    return _batched_in(sequences, order, tokenizer.pad_token_id, config.batch_size)


def _batched_in(sequences: list[tuple[torch.Tensor, torch.Tensor]], order: torch.Tensor,
                pad_id: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every source's (ids, mask) rows, padded to one width, in ``order``, in batches."""
    ids_all = _pad_cat([ids for ids, _ in sequences], pad_id)
    mask_all = _pad_cat([mask for _, mask in sequences], 0)
    return batched(ids_all[order], mask_all[order], size)


def batched(ids: torch.Tensor, mask: torch.Tensor,
            size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) rows in consecutive batches of ``size``."""
    return [(ids[i:i + size], mask[i:i + size]) for i in range(0, len(ids), size)]


def source_sequences(store: ArtifactStore, stats: Artifact, tokenizer,
                     config: AllocateConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) of ``n_sequences / sources`` sequences from each source behind the stats."""
    from gprune.data.corpus import sample_sequences
    from tasks.corpus import read_split

    corpus_keys = [store.read(k, stage="capture").manifest["inputs"]["corpus"]
                   for k in stats.extra["capture_keys"]]
    per_source = max(1, config.n_sequences // len(corpus_keys))
    return [sample_sequences(read_split(store, key, "calibration"), tokenizer, per_source,
                             config.seq_len, seed=config.seed + 1000 + i)
            for i, key in enumerate(corpus_keys)]


def source_inputs(config: AllocateConfig, store: ArtifactStore, stats: Artifact):
    """The dense model, its adapter and per source a list of calibration batches."""
    model, tokenizer, adapter = dense_model(config, stats)
    return model, adapter, [batched(ids, mask, config.batch_size)
                            for ids, mask in source_sequences(store, stats, tokenizer, config)]


def _pad_cat(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
                      for t in tensors])


def margin_inputs(config: AllocateConfig, store: ArtifactStore, stats: Artifact, task: str,
                  items: int):
    """The dense model, its adapter and ``items`` questions of ``task``'s training split
    (``gprune.eval.mc_tasks.training_rows``; never the items the choice stage evaluates)."""
    import random

    from gprune.eval.mc_tasks import training_rows
    from gprune.maths.gisp_taylor import margin_items

    rows, _ = training_rows(task)
    rows = random.Random(config.seed).sample(rows, min(items, len(rows)))
    model, tokenizer, adapter = dense_model(config, stats)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return model, adapter, margin_items(tokenizer, rows, pad)
