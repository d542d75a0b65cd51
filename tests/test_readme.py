"""The README's examples run as written (with a small photo in place of examples/photo.png)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tileup.imageio import read_parameters

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(section: str) -> str:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block under '## {section}'"
    return match.group(1)


def test_python_api_section_runs_with_the_builtin_model(
    tmp_path: Path, photo: np.ndarray, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    (tmp_path / "examples").mkdir()
    small = np.round(photo[:32, :40] * 255).astype(np.uint8)
    Image.fromarray(small).save(tmp_path / "examples" / "photo.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(_python_block("Python API"), "README.md", "exec"), namespace)
    assert Image.open("big.png").size == (80, 64)
    assert "Upscaler: realesrgan-x4fast" in (read_parameters("big.png") or "")
    assert namespace["wide"].image.size == (640, 512)  # type: ignore[attr-defined]
    written = namespace["outcomes"].written  # type: ignore[attr-defined]
    assert [p.parent.name for p in written] == ["out"] and written[0].is_file()
    assert "'tiles'" in capsys.readouterr().out
