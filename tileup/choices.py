"""The names users choose from, one home each (plain tuples: importing this costs nothing).

Settings validate against them, the CLI lists them and the stages that act on a name import it
from here, so a name cannot be accepted in one place and unknown in another.
"""

from __future__ import annotations

DTYPES = ("auto", "fp32", "fp16", "bf16")
"""Compute precision: ``auto`` picks per device and model."""

MODES = ("fused", "redraw")
"""Re-diffusion modes: all tiles blended every step, or per-tile img2img (Ultimate SD Upscale)."""

ORDERS = ("linear", "chess")
"""Order of redrawn tiles and seam-fix regions."""

BLENDS = ("gaussian", "cosine", "linear")
"""Weight windows of fused tiles."""

SEAM_FIX_MODES = ("none", "band", "half-tile", "half-tile+intersections")
"""Ultimate SD Upscale's seam-fix passes."""

VAE_STATS = ("exact", "estimated")
"""Where the tiled VAE's GroupNorm statistics come from: the whole image, or a small copy of it
(A1111's and ComfyUI's Tiled VAE "Fast Encoder / Fast Decoder")."""

COLOR_FIXES = ("none", "wavelet", "adain")
"""Colour fix after re-diffusion, against the pixel-upscaled source."""

PREDICTIONS = ("auto", "epsilon", "v_prediction")
"""What the UNet predicts; ``auto`` reads it from the checkpoint."""

RESAMPLERS = ("lanczos", "bicubic", "bilinear", "nearest", "area")
"""Plain pixel resamplers usable as ``--upscaler``."""

LATENT_MODES = (
    "nearest",
    "nearest-exact",
    "bilinear",
    "bicubic",
    "area",
    "bilinear-antialiased",
    "bicubic-antialiased",
    "bislerp",
)
"""Latent interpolation modes (``--upscaler latent-MODE``)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
"""Image files tileup reads from folders and writes."""

CHECKPOINT_ENV = "TILEUP_CHECKPOINT"
"""Environment variable naming the default checkpoint."""

MODELS_ENV = "TILEUP_MODELS"
"""Environment variable listing extra model folders (``os.pathsep``-separated)."""

DEFAULT_MAX_PIXELS = 16384 * 16384
"""The largest input or output, in pixels, unless the caller raises it (``--max-pixels``)."""
