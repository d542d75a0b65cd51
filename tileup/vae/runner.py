"""The one VAE runner of a loaded model: precision, placement and the fp32 fallback, once.

Every VAE call of every mode goes through :class:`VaeRunner`: whole canvases through the exact
tiled VAE (:mod:`tileup.vae.tiled`), small crops (redraw regions) through the plain VAE. The VAE
keeps float32 weights on the device; a copy in the compute precision is made once when that
differs. When a half-precision pass produces NaN/inf (the SD 1.5 and SDXL VAEs overflow in fp16)
the pass runs again in float32, the fallback is noted, and every later call of the runner stays
in float32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tileup.devices import hwc_view
from tileup.vae.estimated import estimated_decode, estimated_encode
from tileup.vae.protocols import Vae
from tileup.vae.tiled import NonFiniteError, tiled_decode, tiled_encode, vae_scale_factor

_Run = Callable[[Vae, torch.dtype], torch.Tensor]
"""``run(vae, dtype)``: one VAE pass with ``vae`` in ``dtype``."""


@dataclass(frozen=True)
class VaeOptions:
    """How the VAE runs: tiled-VAE tile (pixels), tiles or crops per call, activation store."""

    tile: int
    batch: int
    store: str
    store_bytes: int | None = None
    """With a memory plan: device bytes the tiled VAE's activations may take (the rest wait on
    the host); None: ``store`` decides."""
    lanes: tuple[VaeRunner, ...] = ()
    """Runners of copies on other devices that take turns with the tiled VAE's tile batches."""
    attention_on_host: bool = False
    """The tiled VAE's mid-block attention keeps Q, K and V on the host (a memory plan's
    :attr:`tileup.memory.MemoryPlan.vae_attention_on_host`)."""
    scores_bytes: int | None = None
    """Device bytes the mid-block attention's chunk of scores may take (a memory plan's
    :attr:`tileup.memory.MemoryPlan.vae_scores_bytes`); None: as far as free memory allows."""
    statistics: str = "exact"
    """Where whole canvases' GroupNorm statistics come from: ``exact`` (the whole image's) or
    ``estimated`` (a small copy's; :mod:`tileup.vae.norms`)."""
    compile: bool = False
    """Run crops (redraw regions) one at a time through a ``torch.compile``-d VAE
    (:func:`tileup.sampling.compiled.compile_module`: one compilation per crop size; a dynamic
    batch would compile batch 1 apart, as dynamo specialises sizes 0 and 1); whole canvases
    take the tiled VAE either way. Measured against each redraw wave's crops in one call with
    the batch dynamic and channels-last weights (H200, 2026-11-30, f9bee10): the compiled
    redraw's stage took 9.78 s either way, with 117 s of compilation instead of 88 s and a
    4.17 GiB peak instead of 3.00 GiB."""

    @classmethod
    def for_device(cls, device: torch.device, tile: int) -> VaeOptions:
        """Batch 4 with the store chosen by free memory on CUDA; batch 1, host store on CPU."""
        if device.type == "cuda":
            return cls(tile=tile, batch=4, store="auto")
        return cls(tile=tile, batch=1, store="cpu")


class VaeRunner:
    """A diffusers AutoencoderKL on ``device``, run in ``dtype`` with one sticky fp32 fallback."""

    def __init__(
        self, vae: Vae, device: torch.device, dtype: torch.dtype, options: VaeOptions
    ) -> None:
        self.vae = vae.to(device=device)
        self.device = device
        self.dtype = dtype
        self.options = options
        self.factor = vae_scale_factor(vae)
        self.scale = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self._cast: Vae | None = None
        self._compiled: dict[tuple[str, int], nn.Module] = {}
        self._unchecked: list[tuple[torch.Tensor, torch.dtype]] = []
        """Device flags of crop passes not yet read (:meth:`check_finite`) and their dtype."""
        self.calls = 0

    def _module(self) -> Vae:
        """The VAE in the current precision (the fp32 original, or its cached cast copy)."""
        return self.module_in(self.dtype)

    def module_in(self, dtype: torch.dtype) -> Vae:
        """The VAE in ``dtype``: the fp32 original, or a cast copy (cached for ``self.dtype``)."""
        params = list(self.vae.parameters())
        if dtype == torch.float32 or not params or params[0].dtype == dtype:
            return self.vae
        if self._cast is None or next(self._cast.parameters()).dtype != dtype:
            self._cast = copy.deepcopy(self.vae).to(self.device, dtype)
        return self._cast

    def _lane_args(
        self, lanes: Sequence[VaeRunner], dtype: torch.dtype
    ) -> list[tuple[Vae, torch.device]]:
        """The tiled VAE's ``lanes``: each other runner's VAE in ``dtype`` with its device, for
        the runners whose VAE is on their device (a VAE parked on the host takes no turn)."""
        return [
            (r.module_in(dtype), r.device)
            for r in lanes
            if next(r.vae.parameters()).device == r.device
        ]

    def _guarded(self, run: _Run, notes: list[str]) -> torch.Tensor:
        """``run(module, dtype)``; on NaN/inf in half precision, noted and once more in fp32."""
        try:
            return run(self._module(), self.dtype)
        except NonFiniteError:
            if not self.fall_back(notes):
                raise
            return run(self.vae, torch.float32)

    def fall_back(self, notes: list[str]) -> bool:
        """Switch to float32 for good after NaN/inf in half precision (noted); False when the
        runner already is in float32 (nothing to fall back to)."""
        if self.dtype == torch.float32:
            return False
        notes.append(f"VAE produced NaN/inf in {self.dtype}; re-ran it in fp32")
        self.dtype, self._cast = torch.float32, None
        return True

    def replica(self, device: torch.device) -> VaeRunner:
        """A runner of a copy of this VAE on ``device``, in the same precision and options."""
        vae = copy.deepcopy(self.vae).to(device)
        return VaeRunner(vae, device, self.dtype, self.options)

    def place(self, device: torch.device) -> None:
        """Move the VAE (and its cast copy) to ``device``: the host frees the device for the
        UNet under a tight memory plan; its own device brings it back."""
        self.vae.to(device=device)
        if self._cast is not None:
            self._cast.to(device=device)

    # -- whole canvases (exact tiled VAE) ---------------------------------------------------

    def encode_canvas(
        self, rgb: np.ndarray, notes: list[str], options: VaeOptions | None = None
    ) -> torch.Tensor:
        """HxWx3 float32 in [0, 1] (multiples of f) → scaled latents 1×C×h×w (CPU float32).
        ``options`` (a memory plan's batch and store, the lanes) override the runner's for this
        call."""
        # as it lies (H×W×3: a channels-last view, the tiled VAE's layout on CUDA), mapped to
        # [-1, 1] as the engine copies it in
        image = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)
        o = options or self.options

        encode = estimated_encode if o.statistics == "estimated" else tiled_encode

        def run(vae: Vae, dtype: torch.dtype) -> torch.Tensor:
            return encode(
                vae,
                image[None],
                tile=o.tile,
                device=self.device,
                dtype=dtype,
                batch=o.batch,
                store=o.store,
                store_limit=o.store_bytes,
                notes=notes,
                lanes=self._lane_args(o.lanes, dtype),
                unit_range=True,
                attention_on_host=o.attention_on_host,
                scores_limit=o.scores_bytes,
            )

        return self._guarded(run, notes) * self.scale

    def decode_canvas(
        self, latents: torch.Tensor, notes: list[str], options: VaeOptions | None = None
    ) -> np.ndarray:
        """Scaled latents 1×C×h×w → HxWx3 float32 in [0, 1] (``options`` as for encoding)."""
        z = latents.float().cpu() / self.scale
        o = options or self.options
        tile = max(8, o.tile // self.factor)

        decode = estimated_decode if o.statistics == "estimated" else tiled_decode

        def run(vae: Vae, dtype: torch.dtype) -> torch.Tensor:
            return decode(
                vae,
                z,
                tile=tile,
                device=self.device,
                dtype=dtype,
                batch=o.batch,
                store=o.store,
                store_limit=o.store_bytes,
                notes=notes,
                lanes=self._lane_args(o.lanes, dtype),
                unit_range=True,
                attention_on_host=o.attention_on_host,
                scores_limit=o.scores_bytes,
            )

        return hwc_view(self._guarded(run, notes)[0]).numpy()

    # -- crops (plain VAE, batched) ---------------------------------------------------------

    def _crops(
        self, fn: Callable[[Vae, torch.Tensor], torch.Tensor], x: torch.Tensor, notes: list[str]
    ) -> torch.Tensor:
        """``fn`` over ``x`` in parts of ``options.batch`` crops (one with ``options.compile``),
        checked for NaN/inf once for the whole call. In float16, whose range overflows where
        float32's does not (the SD VAEs), that is a host wait now and, on NaN/inf, the call again
        in float32; in bfloat16 and float32 (float32's range) a device flag that
        :meth:`check_finite` reads, so a redraw pass waits once at its end instead of twice a
        wave."""
        parts = torch.split(x, 1 if self.options.compile else max(1, self.options.batch))
        self.calls += len(parts)

        def run(vae: Vae, dtype: torch.dtype) -> torch.Tensor:
            out = torch.cat([fn(vae, part.to(self.device, dtype)).float() for part in parts])
            finite = torch.isfinite(out).all()
            if dtype != torch.float16:
                self._unchecked.append((finite, dtype))
            elif not bool(finite):
                raise NonFiniteError(f"the VAE produced NaN/inf in {dtype}")
            return out

        return self._guarded(run, notes)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` if a crop pass since the last check produced NaN/inf
        (one host wait for all of them; the flags are cleared either way)."""
        if not self._unchecked:
            return
        flags, dtypes = zip(*self._unchecked, strict=True)
        self._unchecked.clear()
        if not bool(torch.stack([f.to(self.device) for f in flags]).all()):
            raise NonFiniteError(f"the VAE produced NaN/inf in {dtypes[-1]}")

    def _crop_pass(self, kind: type[_CropPass], vae: Vae) -> Callable[[torch.Tensor], torch.Tensor]:
        """``kind`` over ``vae``: compiled once per VAE module when ``options.compile``, its
        GroupNorms from per-channel statistics (:mod:`tileup.channel_norm`)."""
        if not self.options.compile:
            return kind(vae)
        key = (kind.__name__, id(vae))
        if key not in self._compiled:
            from tileup import channel_norm
            from tileup.sampling.compiled import compile_module  # imports torch._dynamo

            module = channel_norm.with_group_norms(vae) if channel_norm.for_crop_vae() else vae
            self._compiled[key] = compile_module(kind(module), dynamic_batch=False)
        return self._compiled[key]

    def encode_crops(self, pixels: torch.Tensor, notes: list[str]) -> torch.Tensor:
        """k×3×h×w in [0, 1] → scaled latents k×C×h/f×w/f (float32, on the device)."""
        z = self._crops(lambda vae, x: self._crop_pass(_Encode, vae)(x), pixels * 2 - 1, notes)
        return z * self.scale

    def decode_crops(self, latents: torch.Tensor, notes: list[str]) -> torch.Tensor:
        """Scaled latents → k×3×h×w float32 in [0, 1] (on the device)."""
        z = latents / self.scale
        x = self._crops(lambda vae, part: self._crop_pass(_Decode, vae)(part), z, notes)
        return ((x + 1) / 2).clamp(0, 1)


class _CropPass(nn.Module):
    """One plain VAE pass over a batch of crops, as a module ``torch.compile`` can take."""

    def __init__(self, vae: Vae) -> None:
        super().__init__()
        self.vae = vae


class _Encode(_CropPass):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] → the posterior mean (unscaled latents)."""
        mean: torch.Tensor = self.vae.encode(x).latent_dist.mean
        return mean


class _Decode(_CropPass):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents → pixels in [-1, 1]."""
        sample: torch.Tensor = self.vae.decode(z).sample
        return sample
