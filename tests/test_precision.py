"""The KL check's students in bfloat16: what runs in which precision, and how close it stays."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gprune.maths.plan_check import calibration_kl, pruned_copy
from gprune.maths.precision import in_precision, native_bfloat16, resolve_precision
from gprune.models.adapters import adapter_for
from gprune.models.tiny import tiny_model
from tests.test_plan_check import batches
from tests.test_surgery import random_plan


def test_resolve_precision_follows_the_device_and_refuses_unknown_names():
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    want = "bfloat16" if native_bfloat16("cpu") else "float32"
    assert resolve_precision("auto", "cpu") == want
    with pytest.raises(ValueError, match="one of auto, float32, bfloat16"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "starcoder2"])   # GQA, biases
def test_a_bfloat16_student_keeps_the_float32_kl_and_leaves_the_dense_model(family):
    dense = tiny_model(family)
    adapter = adapter_for(dense.config)
    plan = random_plan(adapter.shape(dense.config), "x", family, seed=3)
    want = calibration_kl(dense, pruned_copy(dense, adapter, plan, None), batches())
    student = in_precision(pruned_copy(dense, adapter, plan, None), "bfloat16")
    linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(p.dtype == torch.float32 for p in dense.parameters())
    got = calibration_kl(dense, student, batches())
    assert want > 0.01 and got == pytest.approx(want, rel=0.01)     # measured <= 0.2%
    plain = pruned_copy(dense, adapter, plan, None)
    assert in_precision(plain, "float32") is plain
