"""See before you run: a job's tiles, seam-fix regions, counts, memory plan and estimate.

Everything comes from the pipeline's own planning (``Upscaler.planned_tiles``, ``_job_grid``,
``_passes``, ``_plan``, the fused grid and the SR model's cores): the page only draws the boxes
returned here. Boxes are ``[left, top, width, height]`` in output pixels.
"""

from __future__ import annotations

from typing import Any

from tileup.errors import TileupError
from tileup.memory import MemoryBudgetError
from tileup.options import fused_options, target_size
from tileup.pipeline import Upscaler
from tileup.tiler import Box, split_box
from tileup.web.engines import GeometryModel


def box_json(box: Box) -> list[int]:
    """``[left, top, width, height]``."""
    return [box.left, box.top, box.width, box.height]


def _clipped(box: Box, height: int, width: int) -> list[int]:
    inside = box.intersect(Box(0, 0, height, width))
    return box_json(inside if inside is not None else Box(box.top, box.left, 0, 0))


def plan_job(engine: Upscaler, height: int, width: int, has_alpha: bool = False) -> dict[str, Any]:
    """The plan of ``engine``'s job over a ``height``×``width`` input (see the module doc).

    Keys: ``input``/``output`` ([width, height]), ``units`` (progress units, as the job counts
    them), ``pixel_tiles`` (SR cores of the first model pass), ``tiles`` (diffusion tiles:
    fused or redraw), ``tile_steps``, ``steps_per_tile``, ``seam_fix`` (passes with their
    regions), ``seam_fix_jobs``, ``seam_fix_tile_steps``, ``memory`` (the memory plan, or
    None with ``memory_note`` saying why), ``notes`` (the engine's notes). Raises TileupError
    for a job that would be refused (too many pixels)."""
    from tileup.modes.fused import fused_grid
    from tileup.upscalers.tiled import count_tiles

    s = engine.settings
    th, tw = target_size(height, width, s)
    if th * tw > s.max_pixels:
        raise TileupError(
            f"output {tw}x{th} = {th * tw} pixels exceeds the limit of {s.max_pixels}; "
            "raise it with max_pixels"
        )
    plan: dict[str, Any] = {
        "input": [width, height],
        "output": [tw, th],
        "units": engine.planned_tiles(height, width, has_alpha),
        "pixel_tiles": [],
        "pixel_tile_count": 0,
        "tiles": [],
        "tile_steps": 0,
        "steps_per_tile": 0,
        "seam_fix": [],
        "seam_fix_jobs": 0,
        "seam_fix_tile_steps": 0,
        "memory": None,
        "memory_note": "",
        "notes": list(engine.notes),
        "mode": None,
    }
    runner = engine.runner
    if runner is not None:
        sy, sx = th / height, tw / width
        cores = split_box(Box(0, 0, height, width), runner.tile or max(height, width))
        plan["pixel_tiles"] = [
            _clipped(
                Box(
                    round(c.top * sy), round(c.left * sx), round(c.height * sy), round(c.width * sx)
                ),
                th,
                tw,
            )
            for c in cores
        ]
        plan["pixel_tile_count"] = count_tiles(height, width, runner.tile)
    model = engine.model
    if model is None:
        plan["memory_note"] = "pixel upscale only: no memory plan"
        return plan
    plan["mode"] = s.mode
    canvas = model.canvas_size(th, tw)
    scheduler_steps = model.step_plan(s.denoise)[1].steps
    if s.mode == "fused":
        grid = fused_grid(model.factor, *canvas, fused_options(s)).scaled(model.factor)
        plan["tiles"] = [_clipped(t.box, th, tw) for t in grid.tiles]
        plan["steps_per_tile"] = scheduler_steps
        plan["tile_steps"] = len(grid) * scheduler_steps
    job_grid = engine._job_grid(model, *canvas)
    for p in engine._passes(job_grid):
        steps = model.step_plan(p.denoise)[1].steps
        boxes = [_clipped(r.box, th, tw) for r in p.regions]
        if p.name == "redraw":
            plan["tiles"] = boxes
            plan["steps_per_tile"] = steps
            plan["tile_steps"] = len(boxes) * steps
            continue
        plan["seam_fix"].append(
            {"name": p.name, "denoise": p.denoise, "regions": boxes, "steps": steps}
        )
        plan["seam_fix_jobs"] += len(boxes)
        plan["seam_fix_tile_steps"] += len(boxes) * steps
    plan["memory"], plan["memory_note"] = _memory(engine, (th, tw))
    return plan


def _memory(engine: Upscaler, target: tuple[int, int]) -> tuple[dict[str, Any] | None, str]:
    """The memory planner's plan for the job, or None and why there is none."""
    if engine.budget is None:
        return None, "no memory plan off CUDA (host memory is not planned)"
    if isinstance(engine.model, GeometryModel):
        return None, "memory plan shown once the checkpoint is loaded (after its first job)"
    try:
        plan = engine._plan(target)
    except MemoryBudgetError as exc:
        return {"error": str(exc)}, str(exc)
    return (plan.as_dict() if plan is not None else None), ""
