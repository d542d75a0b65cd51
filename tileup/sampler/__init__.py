"""Re-diffusion: offline checkpoint loading, prompts, samplers and schedules, the fused tiled
denoiser and the tiled VAE. Importing this package loads diffusers; tileup imports it lazily."""

from __future__ import annotations
