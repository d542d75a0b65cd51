"""The tiled VAE's default Triton kernels build for Hopper (sm_90, the H100/H200) on this
machine, without a GPU: Triton compiles them to PTX and a cubin with its own ptxas. Checked
with the specialisation Triton makes at launch for the tiled VAE's tensors (16-byte aligned
pointers and sizes, unit channel stride), under which every global load is a 16-byte vector.
The values are tested through the interpreter (test_flash.py) and on the GPU (tests/gpu)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tileup.vae import epilogue, softmax, stats  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="Triton without its ptxas")
HOPPER = GPUTarget("cuda", 90, 32)


def _build(kernel: Any, types: dict[str, str], constants: dict[str, int], warps: int) -> Any:
    """``kernel`` compiled for sm_90 with ``types`` for its runtime arguments (each 16-byte
    aligned or divisible by 16, as Triton finds the tiled VAE's at launch) and ``constants``."""
    names = list(inspect.signature(kernel.fn).parameters)
    source = ASTSource(
        fn=kernel,
        signature={n: types.get(n, "constexpr") for n in names},
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in types},
    )
    return triton.compile(source, target=HOPPER, options={"num_warps": warps})


def _global_loads(ptx: str) -> set[str]:
    return set(re.findall(r"ld\.global(?:\.[a-z]+)*(\.v\d)?\.b\d+", ptx))


@pytest.mark.parametrize("blocks", [1, 4])
def test_the_statistics_kernel_builds_for_hopper_with_vector_loads(blocks: int) -> None:
    pointers = {"x_ptr": "*bf16", "mean_ptr": "*fp32", "m2_ptr": "*fp32"}
    sizes = dict.fromkeys(("pixels", "width", "channels"), "i32")
    strides = dict.fromkeys(("stride_b", "stride_h", "stride_w"), "i64")  # channels: 1
    compiled = _build(
        stats._kernel(),
        pointers | sizes | strides,
        {"stride_c": 1, "BLOCK_P": stats._BLOCK_PIXELS, "BLOCK_C": 128, "BLOCKS": blocks},
        warps=4,
    )
    assert compiled.asm["cubin"]
    assert _global_loads(compiled.asm["ptx"]) == {".v4"}  # 8 bf16 a load, never one by one


@pytest.mark.parametrize("one_load", [True, False])
def test_the_online_softmax_kernel_builds_for_hopper_with_vector_loads(one_load: bool) -> None:
    types = {"x_ptr": "*fp32", "p_ptr": "*bf16"}
    types |= dict.fromkeys(("max_ptr", "sum_ptr", "rescale_ptr"), "*fp32")
    types |= dict.fromkeys(("n_cols", "stride_x", "stride_p"), "i32")
    block = softmax._ONE_LOAD if one_load else softmax._BLOCK
    constants = {"BLOCK": block, "ONE_LOAD": one_load}
    compiled = _build(softmax._kernel(), types, constants, warps=min(16, block // 1024))
    assert compiled.asm["cubin"]
    loads = re.findall(r"ld\.global(?:\.[a-z]+)*(\.v\d)?\.b\d+", compiled.asm["ptx"])
    # the scores 4 floats a load; one by one only the row's running maximum and sum
    assert loads.count(".v4") >= (8 if one_load else 2) and loads.count("") == 2
    assert set(loads) == {".v4", ""}


@pytest.mark.parametrize("skip", [True, False])
def test_the_conv_epilogue_kernel_builds_for_hopper_with_vector_loads(skip: bool) -> None:
    types = dict.fromkeys(("out_ptr", "bias_ptr", "skip_ptr"), "*bf16")
    types |= dict.fromkeys(("row_length", "channels", "height"), "i32")
    types |= dict.fromkeys(("skip_stride_b", "skip_stride_h"), "i64")
    constants = {"HAS_SKIP": skip, "BLOCK": epilogue._BLOCK}
    compiled = _build(epilogue._kernel(), types, constants, warps=8)
    assert compiled.asm["cubin"]
    ptx = compiled.asm["ptx"]
    assert _global_loads(ptx) == {".v4"}  # result, bias and skip: 8 bf16 a load
    assert len(re.findall(r"ld\.global", ptx)) == (3 if skip else 2)


@pytest.mark.parametrize("per_group", [10, 40])
def test_the_unet_group_norm_kernel_builds_for_hopper(per_group: int) -> None:
    """tileup.group_norm_kernel on a channels-last bf16 activation (SD 1.5: 10 to 40 channels a
    group; 16-byte loads only where a group's channels are 16-byte aligned)."""
    from tileup import group_norm_kernel

    types = dict.fromkeys(("x_ptr", "out_ptr", "weight_ptr", "bias_ptr"), "*bf16")
    types |= dict.fromkeys(("pixels", "per_group", "groups", "stride_p"), "i32")
    types |= {"eps": "fp32", "stride_b": "i64"}
    block_c = 1 << (per_group - 1).bit_length()
    constants = {"stride_c": 1, "BLOCK_P": group_norm_kernel._BLOCK_P, "BLOCK_C": block_c}
    compiled = _build(group_norm_kernel._kernel(), types, constants, warps=4)
    assert compiled.asm["cubin"]
