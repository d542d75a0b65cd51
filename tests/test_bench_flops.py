"""bench/gpu.py's FLOP formulas for matrix products, every overload (meta tensors: no kernels)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.gpu import _addmm_flops, _mm_flops, flop_formulas


def test_products_with_an_output_dtype_count_two_flops_a_multiply_add() -> None:
    a = torch.empty(8, 16, dtype=torch.bfloat16, device="meta")
    b = torch.empty(16, 4, dtype=torch.bfloat16, device="meta")
    acc = torch.empty(8, 4, device="meta")
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        torch.mm(a, b, out_dtype=torch.float32)
        torch.mm(a, b)
        torch.addmm(acc, a.float(), b.float())
    assert counter.get_total_flops() == 4 * 2 * 8 * 16 * 4


def test_the_formulas_take_the_out_dtype_overloads_arguments() -> None:
    """As PyTorch 2.11's counter calls them for ``addmm.dtype_out`` / ``mm.dtype``: the output
    dtype positional, the output shape by keyword (its own addmm formula failed there)."""
    assert _addmm_flops((8, 4), (8, 16), (16, 4), torch.float32, out_shape=(8, 4)) == 1024
    assert _mm_flops((8, 16), (16, 4), torch.float32, out_shape=(8, 4)) == 1024
