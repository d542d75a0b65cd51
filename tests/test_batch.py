"""tileup.batch: inputs → output paths (mirrored, checked before any work) → one outcome each."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tileup.batch
from tileup.batch import OutputError, Source, expand_inputs, output_path_for, plan_outputs
from tileup.cli import main

FAST = ["--upscaler", "lanczos", "--quiet"]


@pytest.fixture
def photo_file(tmp_path: Path, photo: np.ndarray) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the engine (loading models) is work: it must not start before the checks."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the engine was built before every output was checked")

    monkeypatch.setattr(tileup.batch, "Upscaler", refuse)


def tree(root: Path, photo_file: Path, *names: str) -> Path:
    """``root`` holding a copy of ``photo_file`` under each of ``names``."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(photo_file.read_bytes())
    return root


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder``, hidden ones too, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# -- output paths ----------------------------------------------------------------------------


def test_output_path_for(tmp_path: Path) -> None:
    src = tmp_path / "in" / "photo.jpg"
    assert output_path_for(src, None) == tmp_path / "in" / "photo_tileup.png"
    assert output_path_for(src, tmp_path) == tmp_path / "photo_tileup.png"
    assert output_path_for(src, f"{tmp_path}/new/") == tmp_path / "new" / "photo_tileup.png"
    assert output_path_for(src, tmp_path / "x.webp") == tmp_path / "x.webp"
    assert output_path_for(src, None, suffix="_4x", ext=".tif") == src.with_name("photo_4x.tif")
    # below a root, the sub-folders are mirrored under an output folder (and only there)
    deep = tmp_path / "in" / "a" / "b" / "photo.jpg"
    root = tmp_path / "in"
    assert output_path_for(deep, f"{tmp_path}/out/", root=root) == (
        tmp_path / "out" / "a" / "b" / "photo_tileup.png"
    )
    assert output_path_for(deep, None, root=root) == deep.with_name("photo_tileup.png")
    assert output_path_for(src, tmp_path, root=root) == tmp_path / "photo_tileup.png"


def test_expand_inputs_roots(tmp_path: Path, photo_file: Path) -> None:
    shots = tree(tmp_path / "shots", photo_file, "a.png", "sub/b.png", "sub/deep/c.jpg")
    (shots / "notes.txt").write_text("not an image")
    (shots / "a_tileup.png").write_bytes(b"an earlier output")
    found, missing = expand_inputs([str(shots)], recursive=True)
    assert missing == []
    assert [(s.path.relative_to(shots).as_posix(), s.root) for s in found] == [
        ("a.png", shots),
        ("sub/b.png", shots),
        ("sub/deep/c.jpg", shots),
    ]
    found, _ = expand_inputs([str(shots)])
    assert [s.path.name for s in found] == ["a.png"]
    # a glob's root is its folders before the first wildcard
    found, _ = expand_inputs([f"{shots}/**/*.png"], recursive=True)
    assert {s.root for s in found} == {shots}
    # each file once, however it is named
    found, _ = expand_inputs(
        [str(shots / "a.png"), str(shots / "sub/b.png"), f"{shots}/../shots/a.png", str(shots)]
    )
    assert [s.path for s in found] == [shots / "a.png", shots / "sub" / "b.png"]
    assert found[0].root is None  # named directly: the first mention wins


def test_plan_outputs_mirrors_folder_inputs(tmp_path: Path, photo_file: Path) -> None:
    shots = tree(tmp_path / "shots", photo_file, "a.png", "sub/a.png")
    sources, _ = expand_inputs([str(shots)], recursive=True)
    jobs = plan_outputs(sources, f"{tmp_path}/out/")
    assert [job.output for job in jobs] == [
        tmp_path / "out" / "a_tileup.png",
        tmp_path / "out" / "sub" / "a_tileup.png",
    ]
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_plan_outputs_refuses_two_inputs_for_one_output(tmp_path: Path, photo_file: Path) -> None:
    tree(tmp_path, photo_file, "x/a.png", "y/a.png", "z/b.png", "z/b.jpg")
    sources = [Source(tmp_path / "x" / "a.png"), Source(tmp_path / "y" / "a.png")]
    with pytest.raises(OutputError) as excinfo:
        plan_outputs(sources, f"{tmp_path}/out/")
    message = str(excinfo.value)
    assert message == (
        f"{tmp_path}/x/a.png and {tmp_path}/y/a.png would both be written to "
        f"{tmp_path}/out/a_tileup.png; upscale them in separate runs"
    )
    sources = [Source(tmp_path / "z" / "b.png"), Source(tmp_path / "z" / "b.jpg")]
    with pytest.raises(OutputError, match=r"would both be written to .*b_tileup\.png"):
        plan_outputs(sources, None)


def test_plan_outputs_names_the_first_problem_and_counts_the_rest(
    tmp_path: Path, photo_file: Path
) -> None:
    shots = tree(tmp_path / "shots", photo_file, "a.png", "b.png", "c.png")
    for name in ("a", "b"):
        (shots / f"{name}_tileup.png").write_bytes(b"precious")
    sources, _ = expand_inputs([str(shots)])
    with pytest.raises(OutputError) as excinfo:
        plan_outputs(sources, None)
    assert str(excinfo.value) == (
        f"{shots}/a_tileup.png: already exists; pass --overwrite to replace it "
        "(and 1 more bad output)"
    )
    assert len(plan_outputs(sources, None, overwrite=True)) == 3


# -- a. a missing output folder is created ---------------------------------------------------


def test_missing_output_folder_is_created(tmp_path: Path, photo_file: Path) -> None:
    shots = tree(tmp_path / "shots", photo_file, "a.png", "b.png")
    assert main([str(shots), "-o", f"{tmp_path}/new/out/", *FAST]) == 0
    assert files_under(tmp_path / "new") == [
        "out/.tileup-manifest.jsonl",  # every batch into a folder keeps its manifest
        "out/a_tileup.png",
        "out/b_tileup.png",
    ]
    assert main([str(photo_file), "-o", f"{tmp_path}/single/", *FAST]) == 0
    assert files_under(tmp_path / "single") == [".tileup-manifest.jsonl", "photo_tileup.png"]


# -- b. --recursive mirrors the tree; never two inputs → one output --------------------------


def test_recursive_mirrors_the_input_tree(tmp_path: Path, photo_file: Path) -> None:
    shots = tree(tmp_path / "shots", photo_file, "a.png", "sub/a.png", "sub/deep/b.jpg")
    code = main([str(shots), "--recursive", "-o", f"{tmp_path}/out/", *FAST])
    assert code == 0
    assert files_under(tmp_path / "out") == [
        ".tileup-manifest.jsonl",
        "a_tileup.png",
        "sub/a_tileup.png",
        "sub/deep/b_tileup.png",
    ]
    # a recursive glob mirrors the tree below its fixed folders
    code = main([f"{shots}/**/*.png", "--recursive", "-o", f"{tmp_path}/globbed/", *FAST])
    assert code == 0
    assert files_under(tmp_path / "globbed") == [
        ".tileup-manifest.jsonl",
        "a_tileup.png",
        "sub/a_tileup.png",
    ]


def test_two_inputs_for_one_output_stop_the_run(
    tmp_path: Path, photo_file: Path, no_engine: None, capsys: pytest.CaptureFixture[str]
) -> None:
    tree(tmp_path, photo_file, "x/a.png", "y/a.png")
    out = tmp_path / "out"
    out.mkdir()
    code = main([str(tmp_path / "x" / "a.png"), str(tmp_path / "y" / "a.png"), "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "would both be written to" in err and "a_tileup.png" in err
    assert files_under(out) == []


# -- c. every output is checked before any work ----------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown suffix", "unknown image format .gif"),
        ("no suffix, no folder", "end it with / to write into a new folder"),
        ("existing output", "already exists; pass --overwrite to replace it"),
        ("file as output folder", "is a file, not a folder"),
        ("file as mirrored folder", "is a file, not a folder"),
        ("folder as output file", "is a folder"),
        ("missing folder of a file", "does not exist"),
        ("unwritable folder", "permission denied"),
    ],
)
def test_bad_outputs_exit_2_before_any_work(
    tmp_path: Path,
    photo_file: Path,
    no_engine: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    shots = tree(tmp_path / "shots", photo_file, "a.png", "sub/b.png")
    out = tmp_path / "out"
    out.mkdir()
    args = [str(shots), "--recursive", "-o", f"{out}/", *FAST]
    if case == "unknown suffix":
        args = [str(photo_file), "-o", str(out / "a.gif"), *FAST]
    elif case == "no suffix, no folder":
        args = [str(photo_file), "-o", str(out / "new"), *FAST]
    elif case == "existing output":
        (out / "sub").mkdir()
        (out / "sub" / "b_tileup.png").write_bytes(b"precious")
    elif case == "file as output folder":
        (tmp_path / "taken").write_bytes(b"a file")
        args = [str(shots), "--recursive", "-o", f"{tmp_path}/taken/", *FAST]
    elif case == "file as mirrored folder":
        (out / "sub").write_bytes(b"a file")
    elif case == "folder as output file":
        (out / "a_tileup.png").mkdir()
    elif case == "missing folder of a file":
        args = [str(photo_file), "-o", str(out / "missing" / "a.png"), *FAST]
    elif case == "unwritable folder":
        access = os.access  # as root every folder is writable: pretend this one is not
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != out and access(p, mode))
    before = files_under(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tileup: error: ") and message in lines[0]
    assert files_under(tmp_path) == before  # nothing written


def test_bad_output_among_good_ones_stops_all(
    tmp_path: Path, photo_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shots = tree(tmp_path / "shots", photo_file, "a.png", "b.png", "c.png")
    (shots / "c_tileup.png").write_bytes(b"precious")
    assert main([str(shots), *FAST]) == 2
    assert "c_tileup.png: already exists" in capsys.readouterr().err
    assert sorted(p.name for p in shots.iterdir()) == ["a.png", "b.png", "c.png", "c_tileup.png"]


# -- d. never the input itself ---------------------------------------------------------------


def test_output_is_never_an_input(
    tmp_path: Path, photo_file: Path, no_engine: None, capsys: pytest.CaptureFixture[str]
) -> None:
    original = photo_file.read_bytes()
    assert main([str(photo_file), "-o", str(photo_file), "--overwrite", *FAST]) == 2
    assert "is the input" in capsys.readouterr().err
    alias = tmp_path / "sub" / ".." / "photo.png"  # the same file by another name
    (tmp_path / "sub").mkdir()
    assert main([str(photo_file), "-o", str(alias), "--overwrite", *FAST]) == 2
    # another input's output: photo.png → photo_tileup.png, itself an input of the run
    other = photo_file.with_name("photo_tileup.png")
    other.write_bytes(original)
    assert main([str(photo_file), str(other), "--overwrite", *FAST]) == 2
    assert "is the input" in capsys.readouterr().err
    assert photo_file.read_bytes() == original and other.read_bytes() == original


# -- e. SIGTERM cleans up as SIGINT does -----------------------------------------------------

SLOW_WRITER = """
import sys, time
import tileup.imageio.write as write
from tileup.cli import main

def slow_encode(fh, *args):
    fh.write(b"half an image")
    fh.flush()
    time.sleep(60)

write.encode = slow_encode
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_leaves_no_temporary_file(tmp_path: Path, photo_file: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(photo_file), "-o", str(out / "big.png"), *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(out.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.name[:13] for p in out.iterdir()] == [".big.png.tmp-"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert list(out.iterdir()) == []  # neither the temporary file nor an output
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "Traceback" not in err


# -- f. the output size is refused from the header -------------------------------------------


def declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width``×``height`` RGB pixels (its data is short)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(1000)))
        + chunk(b"IEND", b"")
    )


def test_output_too_large_is_refused_from_the_header(
    tmp_path: Path,
    photo_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(declared_png(12000, 12000))
    decoded: list[Path] = []
    read_image = tileup.batch.read_image

    def spy(path: Path, **kwargs: object) -> object:
        decoded.append(Path(path))
        if Path(path) == big:
            raise AssertionError("decoded: 432 MB for nothing")
        return read_image(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tileup.batch, "read_image", spy)
    code = main([str(big), str(photo_file), "-o", f"{tmp_path}/out/", *FAST])
    assert code == 1
    err = capsys.readouterr().err
    assert (
        f"{big}: output 24000x24000 = 576000000 pixels exceeds the limit of {16384 * 16384}; "
        "raise it with --max-pixels"
    ) in err
    assert decoded == [photo_file]  # the big one was never decoded
    assert files_under(tmp_path / "out") == [".tileup-manifest.jsonl", "photo_tileup.png"]


def test_outcomes_make_failures_obvious(tmp_path: Path, photo_file: Path) -> None:
    import tileup

    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    settings = tileup.UpscaleSettings(upscaler="lanczos")
    outcomes = tileup.upscale_files(
        [str(photo_file), str(bad)], settings, output=str(tmp_path / "out") + "/"
    )
    assert isinstance(outcomes, tileup.Outcomes) and len(outcomes) == 2
    assert [o.source.name for o in outcomes.failed] == ["bad.png"]
    assert outcomes.written == [tmp_path / "out" / "photo_tileup.png"]
    with pytest.raises(tileup.BatchError, match=r"^1 of 2 files failed; first: .*bad\.png"):
        outcomes.raise_for_errors()
    engine = tileup.Upscaler(settings)
    good = engine.upscale_files([str(photo_file)], output=str(tmp_path / "again") + "/")
    assert good.raise_for_errors() is good and not good.failed
    with pytest.raises(tileup.BatchError, match="no input files"):
        tileup.Outcomes().raise_for_errors()
