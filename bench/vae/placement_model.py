"""A model of the exact tiled VAE under a device-store cap: where each canvas goes and the
FLOPs every pass costs once recomputation is counted. No GPU, no tensors: seconds, not minutes.

It walks the SD VAE's stages (block_out_channels 128/256/512/512, 2 resnets a down block, 3 an
up block, one mid-block attention) with the placement rules of :mod:`tileup.vae.engine` and
:mod:`tileup.vae.tiled` as of 2026-11-30 (session 7): a chainable stage whose output does not
fit the cap is recomputed (up to --max-chain stages deep), other outputs that do not fit wait on the
host; a resnet block keeps its first conv's output only when it and the block's output both fit
(``--rule old``: whenever its input is stored on the device); the decoder's store takes the
attention's Q/K/V room once the attention is done. A pass's cost is its own FLOPs plus those of
every recomputed canvas behind its inputs (crops' halos ignored); the attention counts its
4·N²·C. Use it to weigh a placement rule before spending device time on it, e.g.::

    python bench/vae/placement_model.py --size 8192 --cap-gib 2.28 --part decode --stages

At 8192² on an 8 GiB card (cap 2.28 GiB, the plan's) it counts ~8.8 PFLOP for the decode
(2.9 on a whole GPU, 2.25 of either the attention) and ~4.4 for the encode (2.5): the passes
after the 2048² canvas recompute every stage since it.

``--max-chain`` (``TILEUP_VAE_MAX_CHAIN``) cuts chains shorter, each cut storing a canvas on the
host. 2026-11-30 (session 17), 8192², PFLOP / GiB through the host at chains of at most 2, 4, 8
and 16 stages: decode with the 5 GiB the store has after the attention 3.89/272, 4.78/56,
6.02/96, 8.34/0; encode at the plan's 2.07 GiB 2.98/118, 3.47/35, 4.15/11, 4.38/3. At the 4096²
job's 3.33 GiB the decode counts 0.44/24, 0.57/12, 0.76/0, 0.76/0. Measured (H200, 7b4d24b,
bench/vae/results/profile_h200_8192_8gib_chains.json) the 8192² decode took 19.1 s at chains
of 6, 23.4 s at 16 and 34.5 s at 3: a canvas on the host is read again by every recomputation
behind it, at well under the link's speed, so these byte counts understate the host's cost.
Upsamplers count as four-phase 2×2 convs (16 of a 3×3's 36 multiply-adds: the CUDA engine
since 619f16f, :mod:`tileup.upsample_conv`); ``--plain-up`` counts them plain. 8192², cap
2.065 GiB, decode: 6.10 PFLOP plain, 5.28 with phases (3.85 → 3.03 besides the attention's
2.25: −21 %, the recomputed chains pass through the upsamplers); no cap (--cap-gib 1000): 2.89
→ 2.79; 4096² without a cap 0.30 → 0.27.
``--partial`` lets a canvas too large for the room left keep what fits of its rows on the
device (reads of those rows cost nothing); greedily, as each canvas comes. It barely helps
(2026-12-01, 8192², phases: decode at caps 2.065 / 4 / 8 GiB 5.28 → 5.22, 5.25 → 5.02, 5.11 →
5.04 PFLOP) and hurts the encode (3.43 → 3.82 at 2.065 GiB: early canvases take the room the
later ones' chains needed), so the engine has no such placement. Chains of at most 1 / 2 / 3 /
4 / 6 count 3.44 / 3.87 / 4.41 / 4.73 / 5.28 PFLOP and 232 / 343 / 425 / 161 / 125 GiB
through the host (phases): the 425 GiB fit chains of 3 being the slowest measured (decode 24.7
s against 16.3 at 6, bench/vae/results/host_dma_h200_8192.json); chains of 4 (fewer FLOPs
and little more host traffic than 6) were never measured.
``--estimated`` counts the estimated mode (:mod:`tileup.vae.norms`): GroupNorm affines
recorded by an exact pass over a copy of at most 1024 px (counted too), so a stage whose output
is recomputed, or that only made statistics, runs no pass. 8192², cap 2.065 GiB, phases
(2026-12-01): decode 5.28 → 2.80 PFLOP (uncapped 2.79), encode 3.43 → 2.53 (uncapped 2.53),
the small copy's pass included; 4096² at the 8 GiB card's 3.33 GiB, decode 0.63 → 0.28. Halos
are not counted.
``--rule lend`` (the default, the engine since 7b4d24b): the encoder's store also takes the
attention's Q/K/V room until the attention starts (8192² encode 4.38 → 3.43 PFLOP by this
count; 13.5 → 10.0 s measured).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

GIB = 1 << 30
MAX_CHAIN = 6  # the engine's since 461d5a9 (16 before)


@dataclass(eq=False)
class Canvas:
    """A canvas: ``channels`` at ``scale`` latent px per px; on "device" or "host", or
    recomputed from ``inputs`` (``flops`` a pass, ``depth`` stages behind it)."""

    channels: int
    scale: int
    where: str | None
    inputs: list[Canvas] = field(default_factory=list)
    flops: float = 0.0
    depth: int = 0
    part: float = 0.0
    """Of a recomputed or host canvas, the share of its rows kept on the device (``--partial``);
    reading those costs nothing."""

    @property
    def recomputed(self) -> bool:
        return self.where is None


def conv_flops(cin: int, cout: int) -> float:
    """FLOPs a 3×3 conv spends per output pixel."""
    return 2.0 * 9 * cin * cout


class Walk:
    """The stages in order, with the live canvases the engine would hold."""

    def __init__(
        self,
        latent: int,
        cap: int,
        rule: str,
        max_chain: int = MAX_CHAIN,
        phase_up: bool = True,
        partial: bool = False,
        estimated: bool = False,
    ) -> None:
        self.max_chain, self.phase_up, self.partial = max_chain, phase_up, partial
        self.estimated = estimated
        """Given GroupNorm affines (``--estimated``, :mod:`tileup.vae.norms`): a stage whose
        output is recomputed, or that only made statistics, runs no pass."""
        self.latent, self.cap, self.rule = latent, cap, rule
        self.live: list[Canvas] = []
        self.rows: list[tuple[str, int, int, str, float]] = []
        self.total = 0.0
        self.host_bytes = 0.0

    def nbytes(self, channels: int, scale: int) -> int:
        return channels * (self.latent * scale) ** 2 * 2  # bf16

    def stored(self) -> int:
        """Bytes on the device: live canvases and those behind their recipes, each once."""
        seen: set[int] = set()
        total = 0

        def walk(c: Canvas) -> None:
            nonlocal total
            if id(c) in seen:
                return
            seen.add(id(c))
            if c.recomputed:
                for i in c.inputs:
                    walk(i)
            if c.where == "device":
                total += self.nbytes(c.channels, c.scale)
            else:
                total += int(c.part * self.nbytes(c.channels, c.scale))

        for c in self.live:
            walk(c)
        return total

    def fits(self, nbytes: int) -> bool:
        return self.stored() + nbytes <= self.cap

    def behind(self, c: Canvas) -> tuple[float, float]:
        """(FLOPs, host bytes) of reading ``c`` once."""
        rest = 1.0 - c.part  # the rows not kept on the device
        if not c.recomputed:
            return 0.0, (rest * self.nbytes(c.channels, c.scale) if c.where == "host" else 0.0)
        flops, host = c.flops, 0.0
        for i in c.inputs:
            f, h = self.behind(i)
            flops, host = flops + f, host + h
        return rest * flops, rest * host

    def stage(
        self,
        name: str,
        inputs: list[Canvas],
        channels: int,
        scale: int,
        per_px: float,
        *,
        chain: bool = True,
        keep: bool = True,
        stats_only: bool = False,
    ) -> Canvas | None:
        flops = per_px * (self.latent * scale) ** 2
        cost = flops
        reads = [self.behind(i) for i in inputs]
        depth = 1 + max((i.depth for i in inputs if i.recomputed), default=0)
        nbytes = self.nbytes(channels, scale)
        out = None
        if keep:
            part = 0.0
            if self.partial:  # as many of its rows on the device as the room left holds
                part = max(0.0, min(1.0, (self.cap - self.stored()) / nbytes))
            if self.fits(nbytes):
                out = Canvas(channels, scale, "device")
            elif chain and depth <= self.max_chain:
                out = Canvas(channels, scale, None, list(inputs), flops, depth, part)
            else:
                out = Canvas(channels, scale, "host", part=part)
                self.host_bytes += (1.0 - part) * nbytes
        skipped = self.estimated and (stats_only or (out is not None and out.recomputed))
        if skipped:
            cost = 0.0
        else:
            for f, h in reads:
                cost, self.host_bytes = cost + f, self.host_bytes + h
        where = "-" if out is None else out.where or f"recomputed ({depth} deep)"
        where += " (no pass)" if skipped else ""
        self.rows.append((name, scale, channels, where, cost))
        self.total += cost
        return out

    def resnet(self, x: Canvas, cin: int, cout: int, name: str) -> Canvas:
        inner = self.nbytes(cout, x.scale)
        waits = x.recomputed or x.where == "host"
        both = waits or (self.rule == "new" and not self.fits(2 * inner))
        self.live.append(x)
        skip = 2.0 * cin * cout if cin != cout else 0.0
        if not both:
            h = self.stage(f"{name}.first", [x], cout, x.scale, conv_flops(cin, cout))
            assert h is not None
            self.live.append(h)
            out = self.stage(f"{name}.second", [h, x], cout, x.scale, conv_flops(cout, cout) + skip)
            self.live.remove(h)
        else:
            self.stage(
                f"{name}.first (stats)",
                [x],
                cout,
                x.scale,
                conv_flops(cin, cout),
                keep=False,
                stats_only=True,
            )
            per_px = conv_flops(cin, cout) + conv_flops(cout, cout) + skip
            out = self.stage(f"{name}.both", [x], cout, x.scale, per_px)
        self.live.remove(x)
        assert out is not None
        return out

    def lend(self) -> None:
        """Under the "lend" rule the encoder's store takes the attention's Q/K/V room until it
        starts (the engine lends in the encode only)."""
        if self.rule == "lend":
            self.cap += 3 * self.nbytes(512, 1)

    def reclaim(self) -> None:
        """The attention takes its room back: live device canvases over the cap go to the host,
        largest first (each copied out once)."""
        if self.rule != "lend":
            return
        self.cap -= 3 * self.nbytes(512, 1)
        seen: list[Canvas] = []

        def stored(c: Canvas) -> None:
            if c.recomputed:
                for i in c.inputs:
                    stored(i)
            elif c.where == "device" and not any(c is s for s in seen):
                seen.append(c)

        for c in self.live:
            stored(c)
        for c in sorted(seen, key=lambda c: self.nbytes(c.channels, c.scale), reverse=True):
            if self.stored() <= self.cap:
                break
            c.where = "host"
            self.host_bytes += self.nbytes(c.channels, c.scale)
            self.rows.append(("(to the host)", c.scale, c.channels, "host", 0.0))

    def attention(self, x: Canvas, channels: int) -> Canvas:
        self.live.append(x)
        self.reclaim()
        tokens = (self.latent * x.scale) ** 2
        self.stage("mid.attn.project", [x], channels, x.scale, 6.0 * channels**2, keep=False)
        scores = 4.0 * tokens * tokens * channels
        self.rows.append(("mid.attn.scores", x.scale, channels, "-", scores))
        self.total += scores
        out = self.stage("mid.attn.out", [x], channels, x.scale, 2.0 * channels**2, chain=False)
        self.live.remove(x)
        assert out is not None
        return out

    def resample(self, x: Canvas, scale: int, channels: int, name: str) -> Canvas:
        self.live.append(x)
        flops = conv_flops(channels, channels)
        if scale > x.scale and self.phase_up:  # four 2×2 phases: 16 of 36 multiply-adds
            flops *= 4 / 9
        out = self.stage(name, [x], channels, scale, flops)
        self.live.remove(x)
        assert out is not None
        return out


def encode(w: Walk) -> None:
    w.lend()
    image = Canvas(3, 8, "device" if w.fits(w.nbytes(3, 8)) else "host")
    w.live.append(image)
    x = w.stage("conv_in", [image], 128, 8, conv_flops(3, 128))
    assert x is not None
    w.live.remove(image)
    cin = 128
    for b, c in enumerate((128, 256, 512, 512)):
        for r in range(2):
            x = w.resnet(x, cin, c, f"down{b}.res{r}")
            cin = c
        if b < 3:
            x = w.resample(x, x.scale // 2, c, f"down{b}.down")
    x = w.resnet(x, 512, 512, "mid.res0")
    x = w.attention(x, 512)
    x = w.resnet(x, 512, 512, "mid.res1")
    w.live.append(x)
    w.stage("conv_out", [x], 8, 1, conv_flops(512, 8), keep=False)


def decode(w: Walk) -> None:
    z = Canvas(4, 1, "device")
    w.live.append(z)
    x = w.stage("conv_in", [z], 512, 1, conv_flops(4, 512))
    assert x is not None
    w.live.remove(z)
    x = w.resnet(x, 512, 512, "mid.res0")
    x = w.attention(x, 512)
    if w.rule != "old":
        w.cap += 3 * w.nbytes(512, 1)  # Q, K and V go to the store
    x = w.resnet(x, 512, 512, "mid.res1")
    cin = 512
    for b, c in enumerate((512, 512, 256, 128)):
        for r in range(3):
            x = w.resnet(x, cin, c, f"up{b}.res{r}")
            cin = c
        if b < 3:
            x = w.resample(x, x.scale * 2, c, f"up{b}.up")
    w.live.append(x)
    w.stage("conv_out", [x], 3, 8, conv_flops(128, 3), keep=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192, help="image side in px")
    p.add_argument("--cap-gib", type=float, default=2.28, help="the device store's cap")
    p.add_argument("--part", choices=["encode", "decode"], default="decode")
    p.add_argument("--rule", choices=["lend", "new", "old"], default="lend")
    p.add_argument("--stages", action="store_true", help="a line per stage")
    p.add_argument("--max-chain", type=int, default=MAX_CHAIN, help="TILEUP_VAE_MAX_CHAIN")
    p.add_argument(
        "--plain-up", action="store_true", help="upsamplers as plain 3×3 convs (not phases)"
    )
    p.add_argument(
        "--partial",
        action="store_true",
        help="a canvas too large for the room left keeps what fits of its rows on the device",
    )
    p.add_argument(
        "--estimated",
        action="store_true",
        help="GroupNorm affines from an exact pass over a copy of at most 1024 px (counted)",
    )
    a = p.parse_args()
    cap, part = int(a.cap_gib * GIB), encode if a.part == "encode" else decode
    w = Walk(a.size // 8, cap, a.rule, a.max_chain, not a.plain_up, a.partial, a.estimated)
    part(w)
    if a.estimated:  # the small copy's exact pass
        small = Walk(min(a.size, 1024) // 8, cap, a.rule, a.max_chain, not a.plain_up, a.partial)
        part(small)
        w.rows.append(("(the small copy's pass)", 1, 0, "-", small.total))
        w.total += small.total
        w.host_bytes += small.host_bytes
    if a.stages:
        for name, scale, channels, where, cost in w.rows:
            print(f"{name:24} @{scale} {channels:4} {where:22} {cost / 1e12:9.2f} TFLOP")
    print(
        f"{a.part} {a.size}² cap {a.cap_gib} GiB ({a.rule} rule, chains of at most "
        f"{a.max_chain}): {w.total / 1e15:.2f} PFLOP, ",
        end="",
    )
    print(f"{w.host_bytes / GIB:.1f} GiB through the host")


if __name__ == "__main__":
    main()
