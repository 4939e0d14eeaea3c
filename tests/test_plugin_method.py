"""A method defined in this file only runs through the whole flow: plan, evaluation, report.

``ToyReverse`` keeps, in every layer, the units the magnitude baseline would remove
(the lowest weight scores). Nothing outside this file knows it: defining the class
registers it, and the flow, the stages and the report find it by name.
"""
from __future__ import annotations

import pandas as pd
import pytest
from pydantic import Field

from artifacts.store import ArtifactStore
from gprune.maths.plan import PruningPlan
from gprune.maths.score import score_units
from gprune.methods.allocators import AllocatorName
from gprune.methods.base import METHODS, Method, MethodParams

TINY = dict(model="tiny:llama", sources=["wikipedia", "docs"], eval_sources=["docs"],
            methods=["toy_reverse"], sparsities=[0.3], capture_sequences=4, capture_seq_len=32,
            capture_batch_size=2, eval_tokens=128, eval_seq_len=64, mc_tasks=[],
            speed=False, device="cpu")


class ToyParams(MethodParams):
    allocator: AllocatorName = Field("uniform", description="an allocator name")


class ToyReverse(Method):
    name = "toy_reverse"
    summary = "test only: keeps the lowest-magnitude units"
    Params = ToyParams
    needs = frozenset({"weights"})

    def score_settings(self) -> dict:
        return {"flip": True}

    @classmethod
    def score_units(cls, units, modules_of_units, flip: bool):
        scores, modules = score_units(units, modules_of_units, None, "wanda_sp", gate=False)
        if flip:
            scores["score"] = 1.0 - scores["score"]
        return scores, modules


@pytest.fixture
def toy_registered():
    METHODS["toy_reverse"] = ToyReverse   # (re)registered for this test only
    yield
    METHODS.pop("toy_reverse", None)


def lowest_weight_units(units: pd.DataFrame, layer: int, kind: str, count: int) -> set[int]:
    rows = units[(units.layer == layer) & (units.kind == kind)]
    return set(rows.nsmallest(count, "weight_score").unit.astype(int))


def test_a_method_defined_in_a_test_runs_through_the_flow(prefect_api, tmp_path, toy_registered):
    from flows.gprune_flow import gprune_flow

    state = gprune_flow(config=TINY, store=str(tmp_path / "store"), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    store = ArtifactStore(tmp_path / "store")

    plan = PruningPlan.read(store.read(result["plans"]["toy_reverse@0.3"], stage="allocate").path)
    assert plan.method == "toy_reverse" and abs(plan.achieved_sparsity - 0.3) <= 0.005
    units = pd.read_parquet(store.read(result["stats"], stage="stats").file("units.parquet"))
    for layer in plan.layers:   # brute force: the kept MLP channels are the lowest-magnitude ones
        kept = len(layer.mlp_keep)
        assert set(layer.mlp_keep) == lowest_weight_units(units, layer.layer, "mlp", kept)

    assert set(result["evals"]) == {"dense", "toy_reverse@0.3"}
    report = store.read(result["report"], stage="report")
    assert "toy_reverse" in report.file("report.md").read_text()
