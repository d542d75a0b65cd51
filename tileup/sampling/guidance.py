"""Classifier-free guidance, written once for every mode.

:func:`guidance_inputs` builds what the UNet gets besides the latents for a batch (built once per
batch shape, reused every step); :func:`guided_prediction` runs the UNet on a batch and applies
CFG. The fused denoiser, the redraw passes and every later pass call these two and nothing else,
so guidance, SDXL's added conditions and the batch layout (uncond first, then cond) cannot drift
apart between modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tileup.sampling.conditioning import Conditioning
from tileup.sampling.protocols import UNet
from tileup.sampling.shared_prefix import pairs_guidance


@dataclass(frozen=True, eq=False)
class GuidanceInputs:
    """Text states for a batch (uncond then cond under guidance) and SDXL's added conditions."""

    context: torch.Tensor
    added: dict[str, torch.Tensor] | None
    guided: bool


def guidance_inputs(
    conditioning: Conditioning,
    cfg: float,
    count: int,
    *,
    time_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> GuidanceInputs:
    """What the UNet gets besides the latents for a batch of ``count`` samples.

    The text states (uncond then cond when ``cfg != 1``) and, when the conditioning has pooled
    vectors (SDXL), the added conditions: pooled text embeds and ``time_ids`` (count×6: original
    size, crop top-left, target size, in pixels; cast to ``dtype``), doubled alike under
    guidance. ValueError when SDXL conditioning comes without ``time_ids``.
    """
    c, guided = conditioning, cfg != 1.0
    embeds = [c.uncond, c.cond] if guided else [c.cond]
    context = torch.cat([e.expand(count, -1, -1) for e in embeds]).to(device)
    if c.pooled_cond is None or c.pooled_uncond is None:
        return GuidanceInputs(context, None, guided)
    if time_ids is None:
        raise ValueError("SDXL conditioning needs time_ids")
    pooled = [c.pooled_uncond, c.pooled_cond] if guided else [c.pooled_cond]
    text_embeds = torch.cat([p.expand(count, -1) for p in pooled]).to(device)
    ids = time_ids.to(device, dtype or text_embeds.dtype)
    added = {"text_embeds": text_embeds, "time_ids": torch.cat([ids, ids]) if guided else ids}
    return GuidanceInputs(context, added, guided)


def guided_prediction(
    unet: UNet,
    x: torch.Tensor,
    t: torch.Tensor | float,
    inputs: GuidanceInputs,
    cfg: float,
) -> torch.Tensor:
    """The UNet's prediction for a batch ``x`` (k×C×h×w, in the UNet's dtype) at ``t`` after
    classifier-free guidance: under guidance uncond and cond run as one batch of 2k and the
    result is ``u + cfg·(c − u)``; a UNet that :func:`~tileup.sampling.shared_prefix.
    pairs_guidance` gets ``x`` once with the doubled text states and doubles it itself. Returns
    float32."""
    doubled = inputs.guided and not pairs_guidance(unet)
    pred = unet(
        torch.cat([x, x]) if doubled else x,
        t,
        encoder_hidden_states=inputs.context,
        added_cond_kwargs=inputs.added,
        return_dict=False,
    )[0].float()
    if inputs.guided:
        uncond, cond = pred.chunk(2)
        pred = uncond + cfg * (cond - uncond)
    return pred
