"""Named starting points on the page: settings (UpscaleSettings field names) a preset changes."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "Pixel only": {"checkpoint": None, "upscaler": "default", "scale": 2},
    "Seamless (fused)": {
        "mode": "fused",
        "denoise": 0.3,
        "steps": 20,
        "tile": 512,
        "overlap": 64,
        "blend": "gaussian",
        "seam_fix": "none",
        "color_fix": "wavelet",
    },
    "Ultimate SD Upscale classic": {
        "mode": "redraw",
        "tile": 512,
        "padding": 32,
        "mask_blur": 8,
        "order": "linear",
        "denoise": 0.35,
        "seam_fix": "band",
        "seam_width": 64,
        "seam_denoise": 0.35,
        "seam_mask_blur": 4,
        "seam_padding": 16,
    },
    "Low VRAM": {"low_vram": True, "tile_batch": 1, "vae_tile": 256, "mode": "redraw"},
}
"""Preset name → the settings it sets (the others keep their values)."""
