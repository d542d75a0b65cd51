"""bench/vae/profile_vae.py's trace summary: kernel rows only, by kind."""

from __future__ import annotations

from types import SimpleNamespace

from bench.vae.profile_vae import kernel_totals


def _row(key: str, device_us: float, cpu_us: float = 0, count: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        key=key, self_device_time_total=device_us, self_cpu_time_total=cpu_us, count=count
    )


def test_kernel_totals_count_kernel_rows_once_by_kind() -> None:
    table = [
        _row("aten::copy_", 5e6, cpu_us=100),  # an op: its kernels are rows of their own
        _row("cudaLaunchKernel", 9e6),  # a runtime call
        _row("Memcpy HtoD (Pinned -> Device)", 2e6, count=3),
        _row("void at::native::elementwise_kernel<direct_copy_kernel_cuda>", 1.5e6),
        _row("nvjet_sm90_tss_320x128", 3e6),
        _row("void at::native::vectorized_elementwise_kernel<silu>", 1e6),
        _row("triton_poi_fused_0", 0.5e6),
        _row("some_kernel", 0.25e6),
    ]
    got = kernel_totals(table)
    assert got["by_kind_s"] == {
        "gemm/conv": 3.0,
        "host<->device": 2.0,
        "device copy": 1.5,
        "elementwise": 1.0,
        "triton": 0.5,
        "other": 0.25,
    }
    assert got["total_s"] == 8.25
    assert [r["name"] for r in got["top"]][:2] == [
        "nvjet_sm90_tss_320x128",
        "Memcpy HtoD (Pinned -> Device)",
    ]
    assert got["top"][1]["calls"] == 3
