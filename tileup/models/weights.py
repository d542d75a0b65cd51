"""The one place that opens weights files, without ever executing pickled code.

A file is recognised by its content, not its suffix: safetensors, or a PyTorch pickle (the zip
container of ``torch.save`` or the legacy one) read with ``torch.load(weights_only=True)``. The
pickle reader allows, besides tensors and plain containers, only a few inert globals found in real
training checkpoints (see :class:`_Inert`); anything else is refused before any of it runs.

Two views over one opener:

- :func:`open_tensors`: a file's tensors lazily, shapes first, values taken and released part by
  part (a checkpoint's components one after another, never all of them twice);
- :func:`read_weights`: the whole top-level dict at once (what spandrel's SR loader takes).

Every problem is a :class:`WeightsError` whose message is one line naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tileup.errors import TileupError

_Kind = Literal["safetensors", "zip", "pickle"]

REFUSED = (
    "refused to load: the pickle holds code or objects that are not plain weights "
    "(only tensors are loaded; convert it to .safetensors)"
)


class WeightsError(TileupError):
    """A weights file could not be read; the message is one line naming the file."""


def first_line(exc: BaseException) -> str:
    """The first line of ``str(exc)`` (at most 200 characters), or the type name when empty."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


class _Inert:
    """Stands in for the few harmless non-tensor globals found in training checkpoints.

    Real SD 1.x ``.ckpt`` files pickle a PyTorch Lightning callback class and numpy scalars next
    to the weights. ``weights_only`` loading refuses them; mapping just these names to this inert
    class lets those files load while every other global is still refused. Nothing of the file's
    own code runs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "_codecs.encode",
)


def _sniff(path: Path) -> _Kind:
    """The container by its first bytes; WeightsError when it is none of the three."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(9)
    except FileNotFoundError as exc:
        raise WeightsError(f"{path}: no such file") from exc
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    if size == 0:
        raise WeightsError(f"{path}: the file is empty")
    if len(head) == 9 and head[8:9] == b"{":
        header = int.from_bytes(head[:8], "little")
        if 2 <= header <= size - 8:
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol 2 or later
        return "pickle"
    raise WeightsError(f"{path}: not a weights file (neither safetensors nor a PyTorch checkpoint)")


def _load_pickle(path: Path, *, mmap: bool) -> Mapping[Any, Any]:
    """``torch.load(weights_only=True)`` with the inert allow-list; the top-level mapping.

    ``mmap`` (zip container only) maps tensor data instead of reading it.
    """
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with ExitStack() as stack:
            if safe_globals is not None:
                stack.enter_context(safe_globals([(_Inert, name) for name in _INERT_GLOBALS]))
            stack.enter_context(warnings.catch_warnings())
            # harmless: a pickle protocol other than torch's default 2
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for damaged or hostile pickles
        text = str(exc).lower()
        if "weights only load failed" in text and "unsupported operand" in text:
            raise WeightsError(
                f"{path}: not a readable PyTorch checkpoint (its pickle uses instructions the safe "
                "reader does not support; convert it to .safetensors)"
            ) from exc
        if "weights only load failed" in text:
            raise WeightsError(f"{path}: {REFUSED}") from exc
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})"
        ) from exc
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    return loaded


@contextmanager
def _safetensors(path: Path) -> Iterator[Any]:
    """safetensors' ``safe_open`` handle; its errors (also those of reads) as WeightsError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise WeightsError(f"{path}: not a valid safetensors file ({first_line(exc)})") from exc


def _keep(key: str) -> None:
    """``release`` of a reader that holds no reference (safetensors reads each tensor anew)."""


@dataclass(frozen=True, eq=False)
class Tensors:
    """A file's tensors: shapes up front, values read and released part by part.

    ``shapes`` maps every tensor's key to its shape; ``other_keys`` are the keys that hold
    something else (counters, nested dicts, marker values), in file order. ``read(key)`` gives
    a tensor and ``release(key)`` drops the reader's own reference to it.
    """

    shapes: Mapping[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]
    release: Callable[[str], None] = _keep
    other_keys: tuple[str, ...] = ()

    def get(self, key: str) -> torch.Tensor | None:
        """One tensor, without releasing it (only before ``take`` of its prefix); None if absent."""
        return self.read(key) if key in self.shapes else None

    def take(self, prefixes: str | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Tensors whose keys start with ``prefixes``; the file's own reference is released."""
        out = {}
        for key in [k for k in self.shapes if k.startswith(prefixes)]:
            out[key] = self.read(key)
            self.release(key)
        return out


@contextmanager
def open_tensors(path: Path) -> Iterator[Tensors]:
    """The tensors of a weights file, valid inside the ``with`` block.

    A pickle's tensors are those of its ``state_dict`` entry when it has one (Lightning's
    layout), else those of its top level; only string keys count.
    """
    kind = _sniff(path)
    if kind == "safetensors":
        with _safetensors(path) as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            yield Tensors(shapes, f.get_tensor)
        return
    loaded = _load_pickle(path, mmap=kind == "zip")
    state = loaded.get("state_dict", loaded)
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: its state_dict is a {type(state).__name__}, not a dict")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}
    other = [k for k in state if k not in tensors]
    other += [k for k in loaded if k != "state_dict" and k not in state]
    del loaded, state
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    yield Tensors(
        shapes,
        tensors.__getitem__,
        release=tensors.__delitem__,
        other_keys=tuple(map(str, other)),
    )


def read_weights(path: Path) -> dict[str, Any]:
    """The whole top-level dict of a weights file, tensors in memory (nested dicts kept)."""
    kind = _sniff(path)
    if kind == "safetensors":
        with _safetensors(path) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return dict(_load_pickle(path, mmap=False))
