"""Dense vs pruned speed: parameters, FLOPs per token, prefill and decode tokens/s.

    python benchmarks/speed.py [--model smollm2] [--sparsities 0.2 0.4] [--plan KEY ...]

The dense model and each pruned model (sliced in memory with the surgery maths, exactly
what the surgery stage saves) are timed in the same run, interleaved, ``--repeats``
times; the median is reported. Without ``--plan`` the script builds its own plan per
sparsity: uniform per layer, the top MLP channels by weight magnitude (a multiple of
``--align`` per layer), query heads as the uniform allocator picks them (GQA-feasible)
unless ``--heads-per-group`` says how many each KV group keeps; with ``--plan KEY`` (plan artifacts from the store) it uses
those. Each line says which plan was used.

FLOPs per token = 2 * (weights of the decoder's linear layers) + attention scores
(QK^T and AV: 4 * heads * head_dim * context per layer), plus the LM head: in decode
every token pays 2 * hidden * vocab; in prefill only the last position gets logits (as
in generate), so the head's cost is divided by the prompt length. Prefill context is
the causal mean (T + 1) / 2; decode context is T + n / 2. The theoretical speedup is
dense FLOPs / pruned FLOPs; ``*_speedup_over_theoretical`` = measured / theoretical.
Last line: ``prefill_speedup_over_theoretical=<value at the highest sparsity>``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gprune.maths.budget import head_config_for  # noqa: E402
from gprune.maths.evaluate import flops_per_token  # noqa: E402
from gprune.maths.plan import LayerPlan, PruningPlan, prunable_params  # noqa: E402
from gprune.maths.surgery import apply_plan  # noqa: E402
from gprune.models.adapters import FamilyAdapter  # noqa: E402
from gprune.models.loader import load_model, resolve_device, resolve_model  # noqa: E402
from gprune.models.pruned import finalize, param_count  # noqa: E402


# ---- plans -----------------------------------------------------------------------
def uniform_plan(model, adapter: FamilyAdapter, fingerprint: str, sparsity: float,
                 align: int = 8, heads_per_group: int = -1) -> PruningPlan:
    """Uniform plan: every layer keeps the first query heads of its first KV groups and its
    top-|W| MLP channels to reach the target. ``heads_per_group``: -1 = the GQA-feasible
    head count the uniform allocator picks for this sparsity, 0 = all heads, N = N per group."""
    shape = adapter.shape(model.config)
    groups, per_group = shape.kv_heads, heads_per_group or shape.group_size
    if heads_per_group < 0:
        groups, per_group = head_config_for(shape, (1.0 - sparsity) * shape.heads)
    heads = [g * shape.group_size + h for g in range(groups) for h in range(per_group)]
    attn_removed = ((shape.heads - len(heads)) * shape.q_params_per_head
                    + (shape.kv_heads - groups) * shape.kv_params_per_group)
    per_layer = sparsity * prunable_params(shape) / shape.num_layers - attn_removed
    remove = per_layer / shape.params_per_channel
    keep = max(align, int(round((shape.intermediate - remove) / align)) * align)
    layers = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        score = weight_score(layer, adapter)                       # (intermediate,)
        top = torch.topk(score, min(keep, shape.intermediate)).indices.sort().values
        layers.append(LayerPlan.from_heads(i, top.tolist(), heads, shape))
    method = f"uniform-magnitude(align={align},kv_groups={groups},heads_per_kv_group={per_group})"
    return PruningPlan(fingerprint, adapter.name, method, sparsity, shape, tuple(layers))


def weight_score(layer, adapter: FamilyAdapter) -> torch.Tensor:
    """||W_out[:, j]|| * geometric mean of the input rows' norms: (intermediate,)."""
    out = adapter.mlp_output(layer).weight.float().norm(dim=0)             # (inter,)
    rows = [lin.weight.float().norm(dim=1) for lin in adapter.mlp_inputs(layer)]
    return out * torch.stack(rows).log().mean(0).exp()


def store_plans(keys: list[str], store_root: str | None) -> list[PruningPlan]:
    from artifacts.store import ArtifactStore

    store = ArtifactStore(store_root)
    return [PruningPlan.read(store.read(k, stage="allocate").file("plan.json")) for k in keys]


# ---- timing -----------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)   # the model's GPU (cuda:N), not the current one


@torch.inference_mode()
def time_prefill(model, ids: torch.Tensor, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def time_decode(model, ids: torch.Tensor, steps: int, device: str) -> float:
    """Greedy decode of ``steps`` tokens after the prompt; only the steps are timed."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start


def measure(models: dict, ids: torch.Tensor, steps: int, repeats: int, device: str) -> dict:
    """Median prefill and decode tokens/s per model, runs interleaved (order rotates)."""
    names = list(models)
    for name in names:                                     # warm-up
        time_prefill(models[name], ids, device)
        time_decode(models[name], ids, 2, device)
    prefill = {n: [] for n in names}
    decode = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            prefill[name].append(ids.numel() / time_prefill(models[name], ids, device))
            decode[name].append(ids.shape[0] * steps / time_decode(models[name], ids, steps,
                                                                   device))
    return {n: (statistics.median(prefill[n]), statistics.median(decode[n])) for n in names}


# ---- main -------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--plan", nargs="*", default=[], help="plan artifact keys to use instead")
    parser.add_argument("--store", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--align", type=int, default=8)
    parser.add_argument("--heads-per-group", type=int, default=-1,
                        help="query heads kept per KV group by the built-in plan (-1: as the "
                             "uniform allocator chooses for the sparsity, 0: all)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser.parse_args(argv)


def build_models(args, ref, dense, adapter) -> tuple[dict, dict]:
    plans = store_plans(args.plan, args.store) if args.plan else [
        uniform_plan(dense, adapter, ref.fingerprint, s, args.align, args.heads_per_group)
        for s in args.sparsities]
    models, used = {"dense": dense}, {}
    for plan in plans:
        plan.validate_against(adapter.shape(dense.config), ref.fingerprint)
        pruned = copy.deepcopy(dense)
        finalize(pruned, adapter, apply_plan(pruned, adapter, plan))
        name = f"pruned@{plan.target_sparsity:g}"
        models[name], used[name] = pruned.eval(), plan
    return models, used


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    ref = resolve_model(args.model)
    dense, tokenizer, adapter = load_model(ref, device=device, dtype=getattr(torch, args.dtype))
    models, plans = build_models(args, ref, dense, adapter)
    ids = torch.randint(0, dense.config.vocab_size, (args.batch, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(0)).to(device)
    for model in models.values():   # generate() works on every model (not timed)
        model.generate(ids[:1, :8], max_new_tokens=3, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    speeds = measure(models, ids, args.decode_tokens, args.repeats, device)
    t, n = args.prompt_tokens, args.decode_tokens
    print(f"model={args.model} device={device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} batch={args.batch} prompt_tokens={t} "
          f"decode_tokens={n} repeats={args.repeats}")
    flops = {name: (flops_per_token(m, adapter, (t + 1) / 2, lm_head_share=1 / t),
                    flops_per_token(m, adapter, t + n / 2))
             for name, m in models.items()}
    report(models, plans, speeds, flops)


def report(models: dict, plans: dict, speeds: dict, flops: dict) -> None:
    dense_pf, dense_dec = speeds["dense"]
    top = max(plans, key=lambda n: plans[n].target_sparsity)
    last = None
    for name, model in models.items():
        (pf, dec), (f_pf, f_dec) = speeds[name], flops[name]
        line = (f"{name}: params={param_count(model)} prefill_flops_per_token={f_pf:.4g} "
                f"decode_flops_per_token={f_dec:.4g} prefill_tok_s={pf:.1f} decode_tok_s={dec:.1f}")
        if name in plans:
            plan = plans[name]
            th_pf, th_dec = flops["dense"][0] / f_pf, flops["dense"][1] / f_dec
            ratio = (pf / dense_pf) / th_pf
            last = ratio if name == top else last
            line += (f" plan={plan.method} achieved_sparsity={plan.achieved_sparsity:.4f}"
                     f" prefill_speedup={pf / dense_pf:.3f} theoretical={th_pf:.3f}"
                     f" prefill_speedup_over_theoretical={ratio:.3f}"
                     f" decode_speedup={dec / dense_dec:.3f} decode_theoretical={th_dec:.3f}"
                     f" decode_speedup_over_theoretical={(dec / dense_dec) / th_dec:.3f}")
        print(line, flush=True)
    print(f"prefill_speedup_over_theoretical={last:.3f}")   # at the highest sparsity


if __name__ == "__main__":
    main()
