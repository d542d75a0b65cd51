"""Runs tileup.vae.flash through Triton's interpreter and prints what tests/vae/test_flash.py
asserts, as JSON. A process of its own: the interpreter must be on before triton is first
imported (the test session may have imported it for torch.compile)."""

from __future__ import annotations

import itertools
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch

from tileup.vae import attention, epilogue, flash, softmax, stats
from tileup.vae import tiled as tv


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.double() for t in (q, k, v))
    return torch.softmax(q @ k.T / q.shape[-1] ** 0.5, dim=-1) @ v


def error(a: torch.Tensor, b: torch.Tensor, how: str = "max") -> float:
    diff = (a.double() - b.double()).abs()
    return (diff.max() if how == "max" else diff.mean()).item()


def tiny_vae(seed: int) -> torch.nn.Module:
    """A two-level AutoencoderKL with weights seeded by ``seed`` (the tiled VAE's test model)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        layers_per_block=1,
    ).eval()


def softmax_cases() -> dict[str, object]:
    """tileup.vae.softmax's online blocks against PyTorch's softmax over whole rows: rows split
    into blocks of different lengths, a block whose rows fall short of the lanes, a block held
    whole and blocks walked in lane steps; each in float32 and bf16, the kernel and PyTorch's
    ops (``TILEUP_VAE_SOFTMAX=torch``)."""
    cases: dict[str, object] = {}
    specs = {  # rows, block lengths, longest block row held whole
        "5x5000": (5, (1000, 3000, 1000), softmax._ONE_LOAD),
        "3x100": (3, (100,), softmax._ONE_LOAD),
        "2x9000_lane_steps": (2, (4500, 4500), 64),
        "1x4096": (1, (4096,), softmax._ONE_LOAD),
    }
    one_load = softmax._ONE_LOAD
    for name, (rows, blocks, whole) in specs.items():
        gen = torch.Generator().manual_seed(rows * sum(blocks))
        scores = torch.randn(rows, sum(blocks), generator=gen) * 12
        scores[:, -1] += 30  # the maximum in the last block: every earlier block rescaled
        truth = torch.softmax(scores.double(), dim=-1)
        for dtype, how in itertools.product((torch.float32, torch.bfloat16), ("kernel", "torch")):
            softmax._ONE_LOAD = whole
            if how == "torch":
                os.environ["TILEUP_VAE_SOFTMAX"] = "torch"
            row_max = torch.full((rows,), float("-inf"))
            row_sum = torch.zeros(rows)
            parts, rescales, start = [], [], 0
            for length in blocks:
                block = scores[:, start : start + length].clone()
                probs, rescale = softmax.softmax_block(block, row_max, row_sum, dtype)
                parts.append(probs)
                rescales.append(rescale.double())
                start += length
            os.environ.pop("TILEUP_VAE_SOFTMAX", None)
            softmax._ONE_LOAD = one_load
            final = []  # each block's probabilities brought to the final maximum
            for i, probs in enumerate(parts):
                scaled = probs.double()
                for rescale in rescales[i + 1 :]:
                    scaled = scaled * rescale[:, None]
                final.append(scaled)
            mine = torch.cat(final, 1) / row_sum.double()[:, None]
            cases[f"{name}_{str(dtype)[6:]}_{how}"] = {
                "dtype": str(parts[0].dtype),
                "error": error(mine, truth),
                "torch_error": error(torch.softmax(scores, dim=-1).to(dtype), truth),
                "max_error": error(row_max, scores.amax(1)),
                "first_rescale": error(rescales[0], torch.zeros(rows)),
                "probs_at_most_one": bool(all((p <= 1).all() for p in parts)),
            }
    return cases


def stats_cases() -> dict[str, object]:
    """tileup.vae.stats against float64 ``var_mean`` (and PyTorch's float32 path): layouts,
    a large common offset, channels and pixels off the block sizes, a window; and a tiled VAE
    encode with the kernel against one with PyTorch's statistics."""
    cases: dict[str, object] = {}
    specs = {
        "bf16_channels_last_offset": ((2, 64, 13, 11), torch.bfloat16, True, 40.0),
        "float32_nchw": ((3, 3, 5, 7), torch.float32, False, 0.0),
        "bf16_130_channels": ((1, 130, 9, 70), torch.bfloat16, True, 0.0),
    }
    for name, (shape, dtype, channels_last, offset) in specs.items():
        gen = torch.Generator().manual_seed(len(name))
        x = (torch.randn(shape, generator=gen) * 3 + offset).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pieces = {name: x, f"{name}_window": x[:, :, 1:5, 2:6]}
        for (key, t), per_program in itertools.product(pieces.items(), (1, 3)):
            # 3 blocks a program: the last program's blocks run past the pixels
            key += "" if per_program == 1 else "_x3"
            mean, m2 = stats.channel_stats(t, blocks_per_program=per_program)
            var, truth = torch.var_mean(t.double(), dim=(2, 3), correction=0)
            n = t.shape[2] * t.shape[3]
            torch_var, torch_mean = torch.var_mean(t.float(), dim=(2, 3), correction=0)
            cases[key] = {
                "shape": list(mean.shape) + list(m2.shape),
                "dtype": str(mean.dtype),
                "mean_error": error(mean, truth),
                "torch_mean_error": error(torch_mean, truth),
                "m2_relative_error": error(m2 / (var * n), torch.ones_like(var)),
                "torch_m2_relative_error": error(torch_var / var, torch.ones_like(var)),
            }
    vae = tiny_vae(0)
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(3)) * 2 - 1
    merges: list[int] = []
    original = stats._merged

    def counted(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        merges.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    stats._merged = counted  # type: ignore[assignment]
    with torch.no_grad():
        kernel = tv.tiled_encode(vae, image, tile=16, batch=3)
        os.environ["TILEUP_VAE_STATS"] = "torch"
        calls = len(merges)
        torchs = tv.tiled_encode(vae, image, tile=16, batch=3)
        os.environ.pop("TILEUP_VAE_STATS")
    cases["encode"] = {
        "kernel_calls": calls,
        "torch_calls": len(merges) - calls,
        "difference": error(kernel, torchs),
        "scale": kernel.abs().max().item(),
    }
    return cases


def epilogue_cases() -> dict[str, object]:
    """tileup.vae.epilogue against PyTorch's convolution, bias add and skip sum: channels-last
    results with and without a skip window, rows longer than a block, 3 channels; and a tiled
    decode routed through it against one with PyTorch's ops."""
    cases: dict[str, object] = {}
    for dtype, cin, cout, width, skip in itertools.product(
        (torch.float32, torch.float16, torch.bfloat16), (8,), (128, 3), (20,), (True, False)
    ):
        if cout == 3 and skip:
            continue
        gen = torch.Generator().manual_seed(cout + width)
        x = torch.randn(2, cin, 7, width, generator=gen).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, 3, 3, generator=gen) * 0.3).to(dtype)
        b = torch.randn(cout, generator=gen).to(dtype)
        window = None
        if skip:
            big = torch.randn(2, cout, 9, width + 1, generator=gen).to(dtype)
            window = big.contiguous(memory_format=torch.channels_last)[:, :, 2:7, 1 : width - 1]
        got = epilogue.conv2d(x, w, b, (1, 1), (1, 1), 1, window)
        expected = torch.nn.functional.conv2d(x, w, None)
        expected.add_(b.reshape(1, -1, 1, 1))
        if window is not None:
            expected = window + expected
        key = f"{str(dtype)[6:]}_{cout}{'_skip' if skip else ''}"
        cases[key] = {
            "equal": bool(torch.equal(got, expected)),
            "error": error(got, expected),
            "scale": expected.abs().max().item(),
            "channels_last": got.is_contiguous(memory_format=torch.channels_last),
        }
    vae = tiny_vae(1)
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(4))
    launches: list[int] = []
    original = epilogue._kernel

    def counted() -> object:
        launches.append(1)
        return original()

    epilogue._kernel = counted  # type: ignore[assignment]
    from tileup.vae.engine import StagedEngine

    setup = StagedEngine.__init__

    def channels_last(self: StagedEngine, *args: object, **kwargs: object) -> None:
        setup(self, *args, **kwargs)  # type: ignore[arg-type]
        self.channels_last = True  # laid out as on CUDA: the results the kernel takes

    StagedEngine.__init__ = channels_last  # type: ignore[method-assign]
    with torch.no_grad():
        kernel = tv.tiled_decode(vae, z, tile=4, batch=3)
        os.environ["TILEUP_VAE_EPILOGUE"] = "torch"
        calls = len(launches)
        torchs = tv.tiled_decode(vae, z, tile=4, batch=3)
        os.environ.pop("TILEUP_VAE_EPILOGUE")
    StagedEngine.__init__ = setup  # type: ignore[method-assign]
    cases["decode"] = {
        "kernel_calls": calls,
        "torch_calls": len(launches) - calls,
        "difference": error(kernel, torchs),
    }
    return cases


def main() -> None:
    out: dict[str, object] = {}
    for n, keys, d in ((70, 45, 32), (1, 200, 64), (64, 96, 512)):
        gen = torch.Generator().manual_seed(n + keys + d)
        q, k, v = (torch.randn(x, d, generator=gen) * 2 for x in (n, keys, keys))
        mine = flash.flash_attention(q, k, v, config=flash.FlashConfig(16, 16, 4, 1))
        truth = reference(q, k, v)
        torchs = torch.softmax(q @ k.T / d**0.5, dim=-1) @ v
        out[f"float32_{n}_{keys}_{d}"] = {
            "shape": list(mine.shape),
            "dtype": str(mine.dtype),
            "error": error(mine, truth),
            "torch_error": error(torchs, truth),
        }
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(x, 64, generator=gen).half() for x in (48, 300, 300))
    mine = flash.flash_attention(q, k, v, config=flash.FlashConfig(16, 32, 4, 1))
    torchs = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None])[0]
    truth = reference(q, k, v)
    out["half"] = {
        "dtype": str(mine.dtype),
        "error": error(mine, truth, "mean"),
        "torch_error": error(torchs, truth, "mean"),
    }
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(x, 32, generator=gen) for x in (40, 50, 50))
    expected = flash.flash_attention(q, k, v)
    queries = q.clone()
    over = flash.flash_attention(queries, k, v, out=queries)
    out["over_queries"] = {
        "same_storage": over.data_ptr() == queries.data_ptr(),
        "equal": bool(torch.equal(over, expected)),
    }
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 1, 33, 32, generator=gen) for _ in range(3))
    calls: list[int] = []
    original = flash.flash_attention

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    flash.flash_attention = counted  # type: ignore[assignment]
    os.environ.pop("TILEUP_VAE_ATTENTION", None)
    chunked = attention.chunked_attention(q, k, v, budget=33 * 5)
    by_default = len(calls)
    os.environ["TILEUP_VAE_ATTENTION"] = "fused"
    fused = attention.chunked_attention(q, k, v, budget=33 * 5)
    out["routing"] = {
        "calls_by_default": by_default,
        "calls_when_asked": len(calls) - by_default,
        "fused_vs_chunked": error(fused, chunked),
        "error": error(fused[0, 0], reference(q[0, 0], k[0, 0], v[0, 0])),
    }
    out["softmax"] = softmax_cases()
    out["stats"] = stats_cases()
    out["epilogue"] = epilogue_cases()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
