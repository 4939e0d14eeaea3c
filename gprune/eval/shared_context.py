"""lm-eval's HFLM, scoring each context once for all of its continuations.

A multiple-choice example is N loglikelihood requests that share one context (the
question) and differ in the continuation (the options). lm-eval's
``HFLM._loglikelihood_tokens`` runs ``context + continuation`` once per request, so
the context is computed N times (4x for MMLU, 3x for Social IQa), and it computes
logits and a log-softmax over the whole vocabulary at every context position, where
only the continuation's are read. On a CPU that is nearly all of the work: the first
100 examples of ``mmlu_local`` and ``siqa_local`` (SmolLM2 tokenizer) are 40.6k tokens
that way and 13.7k tokens with each context computed once.

``SharedContextHFLM`` overrides only that method (and ``loglikelihood``, to choose
between a progress bar and one log line). Everything else (tasks, prompts, tokenization
of the context/continuation pair, metrics, aggregation, stderr) is lm-eval's. Per
distinct context it runs the context once with a KV cache, keeping only the last
position's logits (which score every continuation's first token), then all of its
continuations in one batch on the cache (right-padded: a causal model's real tokens
never attend to the padding after them, so no mask is needed). The returned
``(logprob, is_greedy)`` pairs are lm-eval's up to float rounding of a KV-cached
forward (about 1e-7 relative on float32; the tests compare them with ``HFLM``'s).

Batching (``passes``): contexts sorted by length, up to ``batch_size`` per forward pass
(left-padded and masked; a pass of equal lengths needs no mask), their continuations in
as few passes as padding allows; on a CPU a forward pass of a small model costs as much
as ~64 tokens, so fewer, fuller passes win. Requests lm-eval
would left-truncate (context + continuation longer than the model's window) and
non-causal backends go to lm-eval's own implementation unchanged.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from gprune.maths.evaluate import cache_keyword, output_cache

log = logging.getLogger("gprune")
Request = tuple[tuple[str, str], list[int], list[int]]


class SharedContextHFLM(HFLM):
    """HFLM whose loglikelihood scores each distinct context once (see the module doc).

    ``progress``: show a progress bar (True), or log one summary line (False).
    """

    def __init__(self, *args: Any, progress: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.stats: dict[str, float] = {}
        forward = inspect.signature(self.model.forward).parameters
        self._keep_last = "logits_to_keep" in forward
        self._cache_kw = cache_keyword(self.model)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False):
        start = time.perf_counter()
        self.stats = {}
        answers = super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)
        seconds = time.perf_counter() - start
        if self.stats:
            log.info("choice: %d loglikelihood requests (%d contexts, %d tokens) in %.1f s, "
                     "%.1f requests/s", len(requests), self.stats["contexts"],
                     self.stats["tokens"], seconds, len(requests) / max(seconds, 1e-9))
        return answers

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal" or not requests:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        start = time.perf_counter()
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        truncated = []
        for i, (_, context, continuation) in enumerate(requests):
            assert len(context) > 0 and len(continuation) > 0
            if len(context) + len(continuation) > self.max_length + 1:
                truncated.append(i)
            else:
                groups[tuple(context)].append(i)
        if truncated:  # lm-eval's left truncation, exactly as it does it
            scored = super()._loglikelihood_tokens([requests[i] for i in truncated], True,
                                                   override_bs)
            for i, answer in zip(truncated, scored):
                results[i] = answer
        bar = tqdm(total=len(requests) - len(truncated), desc="loglikelihood (shared context)",
                   disable=disable_tqdm or self.rank != 0)
        tokens = 0
        for batch in self._batches(groups):
            contexts = [list(context) for context in batch]
            conts = [[requests[i][2] for i in groups[context]] for context in batch]
            for context, indices, answers in zip(batch, (groups[c] for c in batch),
                                                 self._score(contexts, conts)):
                for i, answer in zip(indices, answers):
                    results[i] = answer
                    request_str = requests[i][0]
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                bar.update(len(indices))
            tokens += sum(len(c) for c in contexts) + sum(
                len(c) - 1 for group in conts for c in group)
        bar.close()
        self.stats = {"requests": len(requests), "contexts": len(groups), "tokens": tokens,
                      "truncated": len(truncated), "seconds": time.perf_counter() - start}
        return results  # type: ignore[return-value]

    def _batches(self, groups: dict[tuple[int, ...], list[int]]) -> list[list[tuple[int, ...]]]:
        """Contexts longest first, cut into passes of at most ``batch_size`` (see ``passes``)."""
        contexts = sorted(groups, key=len, reverse=True)
        budget = (512 if self._keep_last else 64) * self._size
        return [contexts[lo:hi] for lo, hi in
                passes([len(c) for c in contexts], self._size, budget)]

    @property
    def _size(self) -> int:
        return self.batch_size if isinstance(self.batch_size, int) else 1

    @torch.no_grad()
    def _score(self, contexts: list[list[int]],
               conts: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """``(logprob, is_greedy)`` of every continuation of each context.

        Contexts of different lengths are left-padded (masked, positions counted from each
        row's first real token), so every row's last position is its last real token; the
        continuations follow at positions ``len(context) + i`` of their own row."""
        device = self.device
        autocast = torch.autocast(device_type=device.type, dtype=self.mixed_precision_dtype,
                                  enabled=self.mixed_precision_dtype is not None)
        lengths = torch.tensor([len(c) for c in contexts], dtype=torch.long)
        width = int(lengths.max())
        ids = torch.zeros((len(contexts), width), dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for b, context in enumerate(contexts):
            ids[b, width - len(context):] = torch.tensor(context)
            mask[b, width - len(context):] = 1
        padded = bool((lengths < width).any())
        rows = sorted(((g, j, cont) for g, group in enumerate(conts)
                       for j, cont in enumerate(group)), key=lambda row: -len(row[2]))
        rest: dict[tuple[int, int], tuple[float, bool]] = {}  # tokens 2.. of (context, option)
        with autocast:
            kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keep_last else {}
            if padded:
                kwargs.update(attention_mask=mask.to(device),
                              position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device))
            out = self.model(input_ids=ids.to(device), use_cache=True, **kwargs)
            # scores every continuation's first token: (contexts, vocab)
            first = F.log_softmax(out.logits[:, -1], dim=-1, dtype=self.softmax_dtype)
            chunks = passes([len(cont) - 1 for _, _, cont in rows], len(rows), 64 * self._size)
            for n, (lo, hi) in enumerate(chunks):
                span = len(rows[lo][2]) - 1  # rows are sorted longest first
                if span == 0:
                    break
                cache = output_cache(out)
                if n < len(chunks) - 1:  # the cache is cut to this chunk's rows in place
                    cache = copy.deepcopy(cache)
                index = torch.tensor([g for g, _, _ in rows[lo:hi]], dtype=torch.long)
                cache.batch_select_indices(index.to(device))
                inputs = torch.zeros((hi - lo, span), dtype=torch.long)
                targets = torch.zeros((hi - lo, span), dtype=torch.long)
                for r, (_, _, cont) in enumerate(rows[lo:hi]):
                    inputs[r, :len(cont) - 1] = torch.tensor(cont[:-1])
                    targets[r, :len(cont) - 1] = torch.tensor(cont[1:])
                kwargs = {self._cache_kw: cache}
                if padded:
                    kwargs.update(
                        attention_mask=torch.cat([mask[index], torch.ones_like(inputs)], 1)
                        .to(device),
                        position_ids=(lengths[index, None] + torch.arange(span)).to(device))
                logits = self.model(input_ids=inputs.to(device), use_cache=True, **kwargs).logits
                if self.softmax_dtype is not None:
                    logits = logits.to(self.softmax_dtype)
                targets = targets.to(device)
                # log_softmax at the targets without materializing it over the vocabulary
                logp = logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)
                hits = logits.argmax(-1) == targets
                for r, (g, j, cont) in enumerate(rows[lo:hi]):
                    k = len(cont) - 1
                    rest[g, j] = (float(logp[r, :k].sum()), bool(hits[r, :k].all()))
        answers: list[list[tuple[float, bool]]] = []
        for g, group in enumerate(conts):
            head, best = first[g], int(first[g].argmax())
            answers.append([])
            for j, cont in enumerate(group):
                logprob, greedy = rest.get((g, j), (0.0, True))
                answers[g].append((float(head[cont[0]]) + logprob, best == cont[0] and greedy))
        return answers


PASS_OVERHEAD_TOKENS = 64


def passes(widths: list[int], max_rows: int, max_tokens: int) -> list[tuple[int, int]]:
    """Cut rows of descending ``widths`` into forward passes ``[lo, hi)``, each padded to
    its first row's width, at most ``max_rows`` rows and ``max_tokens`` padded tokens (a
    single row may exceed it). The cut minimizes padded tokens plus
    ``PASS_OVERHEAD_TOKENS`` per pass: on a CPU a forward pass of a 30-layer model costs
    about as much as that many tokens, so a few padded tokens beat another pass."""
    n = len(widths)
    cost, cut = [0.0] * (n + 1), [n] * (n + 1)
    for lo in range(n - 1, -1, -1):
        cost[lo] = math.inf
        top = max(widths[lo], 1)
        for hi in range(lo + 1, min(n, lo + max_rows) + 1):
            if hi - lo > 1 and (hi - lo) * top > max_tokens:
                break
            total = PASS_OVERHEAD_TOKENS + (hi - lo) * top + cost[hi]
            if total < cost[lo]:
                cost[lo], cut[lo] = total, hi
    chunks, lo = [], 0
    while lo < n:
        chunks.append((lo, cut[lo]))
        lo = cut[lo]
    return chunks
