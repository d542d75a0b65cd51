"""The server's own settings (what the person who starts ``tileup ui`` decides, never a client)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tileup.choices import DEFAULT_MAX_PIXELS

MIB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens and what it offers.

    ``auth`` (user, password) turns on HTTP Basic auth for every route; ``models_dirs`` are the
    upscaler folders (A1111/ComfyUI layouts; their ``Stable-diffusion``/``checkpoints`` and
    ``VAE`` sub-folders are searched for checkpoints and VAEs too); ``checkpoints`` are
    checkpoint files or folders of them (the first file is the default). Outputs are written
    under ``output_dir`` only. Uploads are refused above ``max_upload_bytes`` (whole request)
    and images above ``max_pixels`` (input or output).
    """

    host: str = "127.0.0.1"
    port: int = 7870
    auth: tuple[str, str] | None = None
    models_dirs: tuple[Path, ...] = ()
    checkpoints: tuple[Path, ...] = ()
    output_dir: Path = Path("tileup_outputs")
    device: str = "auto"
    max_upload_bytes: int = 64 * MIB
    max_pixels: int = DEFAULT_MAX_PIXELS
    quiet: bool = False
    extra_headers: dict[str, str] = field(default_factory=dict)

    @property
    def listens_publicly(self) -> bool:
        """Whether the server is reachable from other machines (not a loopback address)."""
        return self.host not in ("127.0.0.1", "localhost", "::1")
