"""Cheap previews of a running job: small JPEGs of the canvas or of its latents.

Latents are shown through a fixed linear latent → RGB projection (the well-known 4×3 factors
of A1111's "Approx cheap" preview, SD 1.x/2.x and SDXL): an approximation of what the VAE would
decode, labelled as such on the page, costing one small matrix product.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SD_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
"""SD 1.x/2.x latent channel → RGB factors (output in about [-1, 1])."""

SDXL_LATENT_RGB = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)
"""SDXL latent channel → RGB factors."""

PREVIEW_SIDE = 384


@torch.no_grad()
def latents_to_rgb(latents: torch.Tensor, family: str = "") -> torch.Tensor:
    """1×4×h×w (or 4×h×w) latents → approximate 3×h×w RGB in [0, 1] (see the module doc)."""
    x = latents[0] if latents.ndim == 4 else latents
    factors = SDXL_LATENT_RGB if family == "sdxl" else SD_LATENT_RGB
    weights = torch.tensor(factors, dtype=torch.float32, device=x.device)
    if x.shape[0] != weights.shape[0]:
        raise ValueError(f"expected {weights.shape[0]} latent channels, got {x.shape[0]}")
    rgb = torch.einsum("chw,cr->rhw", x.float(), weights)
    return ((rgb + 1) / 2).clamp(0, 1)


@torch.no_grad()
def thumbnail(rgb: torch.Tensor, side: int = PREVIEW_SIDE) -> np.ndarray:
    """3×H×W in [0, 1] (any device) → HxWx3 uint8 no larger than ``side`` (area-averaged)."""
    x = rgb.detach().float()
    height, width = x.shape[-2:]
    scale = min(1.0, side / max(height, width))
    if scale < 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = F.interpolate(x[None], size=size, mode="area")[0]
    out = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def jpeg_bytes(pixels: np.ndarray, quality: int = 85) -> bytes:
    """HxWx3 uint8 → JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
