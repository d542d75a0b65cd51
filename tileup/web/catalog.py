"""What a client may name: upscalers, checkpoints and VAEs found in the configured folders.

A client never gives a path: it names an entry of :meth:`Catalog.listing` (or a built-in
upscaler such as ``default``, ``lanczos`` or ``latent-bislerp``), and the server maps the name to
its file. Names with a path separator, ``..``, a drive or a NUL, or not in the listing, are
refused with a one-line :class:`~tileup.settings.SettingsError`. Checkpoints and VAEs are
``.safetensors`` only (nothing pickled is ever loaded by the server); SR models are the files
tileup's safe weights reader loads (``.safetensors``, and ``.pth``/``.pt``/``.ckpt`` read with
``weights_only``, which refuses any file that would run code).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tileup.choices import LATENT_MODES, RESAMPLERS
from tileup.settings import SettingsError
from tileup.upscalers.registry import (
    A1111_LATENT_NAMES,
    A1111_MODEL_FILES,
    iter_model_files,
    models_dirs,
)

CHECKPOINT_SUBDIRS = ("Stable-diffusion", "checkpoints")
VAE_SUBDIRS = ("VAE", "vae")
SAFE_SUFFIX = ".safetensors"
BUILTIN_UPSCALERS = (
    "default",
    *RESAMPLERS,
    "latent",
    *(f"latent-{m}" for m in LATENT_MODES),
)
"""Upscaler names that are no file: the built-in model, the resamplers, the latent modes."""


def check_name(field: str, value: object) -> str:
    """``value`` if it is a plain name (no folder, no ``..``, no drive, no NUL, ≤ 255
    characters); else SettingsError naming ``field``."""
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{field} must be a name from /api/models, got {value!r}")
    bad = (
        "/" in value
        or "\\" in value
        or "\0" in value
        or ".." in value
        or value.startswith("~")
        or (len(value) > 1 and value[1] == ":")
        or len(value) > 255
    )
    if bad:
        raise SettingsError(
            f"{field} must be a name from /api/models, not a path: {value[:80]!r} refused"
        )
    return value


@dataclass(frozen=True)
class Catalog:
    """The configured folders, listed afresh on each call (a model copied in shows up)."""

    models_dirs: tuple[Path, ...] = ()
    checkpoint_paths: tuple[Path, ...] = ()

    def upscalers(self) -> dict[str, Path]:
        """Model name (file stem) → file, from the models folders ($TILEUP_MODELS too)."""
        return {p.stem: p for p in iter_model_files(models_dirs(self.models_dirs))}

    def checkpoints(self) -> dict[str, Path]:
        """Checkpoint name (file name) → ``.safetensors`` file, from ``--checkpoint`` files and
        folders, then the models folders' ``Stable-diffusion``/``checkpoints``; first wins."""
        folders = [d / sub for d in self.models_dirs for sub in CHECKPOINT_SUBDIRS]
        return _safetensors([*self.checkpoint_paths, *folders])

    def vaes(self) -> dict[str, Path]:
        """VAE name → ``.safetensors`` file from the models folders' ``VAE`` sub-folders."""
        return _safetensors(d / sub for d in self.models_dirs for sub in VAE_SUBDIRS)

    def default_checkpoint(self) -> str | None:
        """The first checkpoint offered, or None."""
        return next(iter(self.checkpoints()), None)

    def listing(self) -> dict[str, list[str]]:
        """Names only (never a path): what /api/models returns."""
        return {
            "upscalers": ["default", *self.upscalers()],
            "resamplers": list(RESAMPLERS),
            "latent": ["latent", *(f"latent-{m}" for m in LATENT_MODES)],
            "checkpoints": list(self.checkpoints()),
            "vaes": list(self.vaes()),
        }

    def upscaler(self, name: object) -> str:
        """The ``upscaler`` setting for a client's name: a built-in name, or the listed file."""
        key = check_name("upscaler", name)
        if key.lower() in BUILTIN_UPSCALERS:
            return key.lower()
        found = self.upscalers().get(key) or self._a1111_model(key)
        if found is None:
            raise SettingsError(
                f"upscaler {key!r} is not offered by this server; choose one of "
                f"{', '.join(self.listing()['upscalers'] + list(RESAMPLERS))}"
            )
        return str(found)

    def hr_upscalers(self) -> list[str]:
        """The hires-fix upscaler names offered: A1111's latent names, then the resamplers,
        the built-in model and the models folders' files."""
        latent = ["Latent", *(n[0].upper() + n[1:] for n in A1111_LATENT_NAMES)]
        return [*latent, "None", *RESAMPLERS, "default", *self.upscalers()]

    def hr_upscaler(self, name: object) -> str:
        """The ``hr_upscaler`` setting for a client's name (kept as given, for the metadata): an
        A1111 latent name ("Latent (bicubic antialiased)"), a built-in, or a listed model name
        (the engine finds it in the same folders)."""
        key = check_name("hr_upscaler", name)
        lowered = " ".join(key.lower().split())
        if lowered in A1111_LATENT_NAMES or lowered in ("latent", "none"):
            return key
        if key in self.upscalers() or self._a1111_model(key):  # found again by the engine in
            return key  # the same folders; kept as given for the metadata
        return self.upscaler(key)

    def _a1111_model(self, name: str) -> Path | None:
        """The listed file an A1111 upscaler name stands for ("R-ESRGAN 4x+" →
        RealESRGAN_x4plus), as parameters copied from an A1111 PNG carry them; or None."""
        stem = A1111_MODEL_FILES.get(" ".join(name.lower().split()))
        if stem is None:
            return None
        return next((p for s, p in self.upscalers().items() if s.lower() == stem.lower()), None)

    def checkpoint(self, name: object) -> str:
        """The file of a listed checkpoint name; ``.ckpt`` and unlisted names are refused."""
        key = check_name("checkpoint", name)
        found = self.checkpoints().get(key)
        if found is None:
            if not key.lower().endswith(SAFE_SUFFIX):
                raise SettingsError(
                    f"checkpoint {key!r} refused: this server loads .safetensors checkpoints "
                    "only (a pickled .ckpt could run code)"
                )
            offered = ", ".join(self.checkpoints()) or "none (start tileup ui with --checkpoint)"
            raise SettingsError(f"checkpoint {key!r} is not offered; offered: {offered}")
        return str(found)

    def vae(self, name: object) -> str:
        """The file of a listed VAE name."""
        key = check_name("vae", name)
        found = self.vaes().get(key)
        if found is None:
            offered = ", ".join(self.vaes()) or "none"
            raise SettingsError(f"vae {key!r} is not offered; offered: {offered}")
        return str(found)


def _safetensors(places: Iterable[Path]) -> dict[str, Path]:
    """``.safetensors`` files given directly or found in folders, by file name; first wins."""
    found: dict[str, Path] = {}
    for place in places:
        place = place.expanduser()
        if place.is_file():
            files = [place] if place.suffix.lower() == SAFE_SUFFIX else []
        elif place.is_dir():
            files = sorted(
                p for p in place.iterdir() if p.is_file() and p.suffix.lower() == SAFE_SUFFIX
            )
        else:
            files = []
        for path in files:
            found.setdefault(path.name, path.resolve())
    return found
