"""tileup.manifest: records, the settings hash, resume decisions; and the local batch resuming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tileup
from tileup.cli import main
from tileup.manifest import (
    MANIFEST_NAME,
    History,
    ManifestWriter,
    Record,
    decide,
    hashed_settings,
    histories,
    read_manifest,
    settings_hash,
)
from tileup.settings import UpscaleSettings

FAST = ["--upscaler", "lanczos", "--quiet"]


def rec(status: str, digest: str = "h1", output: str = "a_tileup.png", **kw: object) -> Record:
    return Record(input="/in/a.png", output=output, settings_hash=digest, status=status, **kw)  # type: ignore[arg-type]


# -- records and the file ---------------------------------------------------------------------


def test_record_round_trip_and_bad_lines() -> None:
    record = rec("done", seconds=1.5, size=123, time=7.0)
    assert Record.from_json(record.to_json()) == record
    assert json.loads(record.to_json())["settings_hash"] == "h1"
    for line in ["", "{", "[1]", '{"input": "x"}', record.to_json()[:-5], '{"input":"a",'
                 '"output":"b","settings_hash":"c","status":"running"}']:  # fmt: skip
        assert Record.from_json(line) is None


def test_truncated_last_line_is_ignored_and_closed(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_NAME
    first, second = rec("planned"), rec("done", size=5)
    path.write_text(first.to_json() + "\n" + second.to_json()[:30])  # a crash mid-write
    assert read_manifest(path) == [first]
    with ManifestWriter(path) as writer:
        writer.append([rec("failed", error="boom")])
    records = read_manifest(path)
    assert [r.status for r in records] == ["planned", "failed"]
    assert records[1].time is not None  # stamped
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 3
    assert read_manifest(tmp_path / "none.jsonl") == []


# -- the settings hash ------------------------------------------------------------------------


def test_settings_hash_covers_what_changes_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TILEUP_CHECKPOINT", raising=False)
    base = UpscaleSettings(upscaler="lanczos", scale=2)
    digest = settings_hash(base)
    assert len(digest) == 16 and digest == settings_hash(UpscaleSettings(upscaler="lanczos"))
    # where and how fast it runs: same bytes, same hash
    same = base.replace(device="cpu", vram=4, low_vram=True, tile_batch=3, model_tile=64,
                        max_pixels=10**6, models_dirs=("/elsewhere",))  # fmt: skip
    assert settings_hash(same) == digest
    # re-diffusion knobs do nothing without a checkpoint
    assert settings_hash(base.replace(prompt="a cat", steps=5)) == digest
    # what the bytes are made of
    changes = [{"scale": 3}, {"upscaler": "bicubic"}, {"dtype": "fp16"}, {"checkpoint": "m"}]
    for change in changes:
        assert settings_hash(base.replace(**change)) != digest
    sd = base.replace(checkpoint="m.safetensors")
    assert settings_hash(sd.replace(prompt="a cat")) != settings_hash(sd)
    assert settings_hash(sd.replace(seed=1)) != settings_hash(sd.replace(seed=2))
    redraw = sd.replace(mode="redraw")
    assert settings_hash(redraw.replace(overlap=128)) == settings_hash(redraw)  # not used there
    assert settings_hash(sd.replace(overlap=128)) != settings_hash(sd)  # used in fused mode
    # the checkpoint actually used, from the environment too
    env = {"TILEUP_CHECKPOINT": "m.safetensors"}
    assert settings_hash(base, env) == settings_hash(sd)
    assert hashed_settings(sd.replace(prompt="x")) == {
        "upscaler": "lanczos",
        "checkpoint": "m.safetensors",
        "prompt": "x",
    }


# -- decisions --------------------------------------------------------------------------------


def history(*statuses: str, digest: str = "h1") -> History:
    records = [rec(s, digest, size=10 if s == "done" else None) for s in statuses]
    return histories(records)["/in/a.png"]


@pytest.mark.parametrize(
    ("statuses", "size", "action", "replace"),
    [
        ((), 10, "run", False),
        (("planned", "done"), 10, "skip", False),
        (("planned", "done"), None, "run", True),  # output deleted
        (("planned", "done"), 11, "run", True),  # output changed since
        (("planned",), 10, "run", True),  # interrupted: the output may be ours
        (("planned", "failed"), None, "run", True),  # retried once
        (("planned", "failed", "planned", "failed"), None, "give-up", True),
        (("failed", "failed"), None, "give-up", False),  # never planned here: not ours
        (("planned", "failed", "planned"), None, "run", True),  # the retry was interrupted
        (("done", "planned", "failed", "planned", "failed"), 10, "give-up", True),
        (("failed", "planned", "done", "planned", "failed"), 10, "run", True),  # one since done
    ],
)
def test_decide(statuses: tuple[str, ...], size: int | None, action: str, replace: bool) -> None:
    decision = decide(history(*statuses) if statuses else None, "h1", "a_tileup.png", size)
    assert (decision.action, decision.replace) == (action, replace)


def test_decide_settings_changed_and_give_up_error() -> None:
    records = [rec("planned"), rec("failed", error="a.png: broken"), rec("planned"),
               rec("failed", error="a.png: broken")]  # fmt: skip
    past = histories(records)["/in/a.png"]
    assert past.failures == 2
    assert decide(past, "h1", "a_tileup.png", None).error == "a.png: broken"
    changed = decide(past, "h2", "a_tileup.png", None)
    assert changed.action == "run" and changed.reason == "settings changed"
    done = history("planned", "done")
    assert decide(done, "h2", "a_tileup.png", 10) == decide(done, "h2", "a_tileup.png", 10)
    assert decide(done, "h2", "a_tileup.png", 10).replace  # the manifest says it is ours
    assert decide(done, "h1", "b_tileup.png", None).action == "run"  # another output path


# -- the local batch resumes ------------------------------------------------------------------


@pytest.fixture
def shots(tmp_path: Path, photo: np.ndarray) -> Path:
    """in/ with a.png, b.png (corrupt: fails), c.png, sub/d.png."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    pixels = np.round(photo[:32, :32] * 255).astype(np.uint8)
    for name in ("a.png", "c.png", "sub/d.png"):
        Image.fromarray(pixels).save(folder / name)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def stamps(folder: Path) -> dict[str, int]:
    """Every output's modification time (ns) by relative path; the manifest left out."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def test_rerun_skips_done_retries_failed_once(
    tmp_path: Path, shots: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = [str(shots), "--recursive", "-o", f"{out}/", *FAST]
    assert main(args) == 1
    assert "3 done, 1 failed" in capsys.readouterr().err
    first = stamps(out)
    assert sorted(first) == ["a_tileup.png", "c_tileup.png", "sub/d_tileup.png"]
    records = read_manifest(out / MANIFEST_NAME)
    assert [(r.status, Path(r.input).name) for r in records if r.status != "planned"] == [
        ("done", "a.png"), ("failed", "b.png"), ("done", "c.png"), ("done", "d.png")
    ]  # fmt: skip
    assert (
        records[-1].output == "sub/d_tileup.png"
        and records[-1].size == (out / "sub" / "d_tileup.png").stat().st_size
    )
    # the same command again: the done ones are skipped, the failed one retried (and fails)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "0 done, 1 failed, 3 skipped (done before)" in err and "b.png" in err
    assert stamps(out) == first
    assert len(read_manifest(out / MANIFEST_NAME)) == len(records) + 2  # planned + failed, b
    # a third time: failed twice, not retried; still a failure
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "b.png" in err and "not retried" in err and "0 done, 1 failed, 3 skipped" in err
    assert len(read_manifest(out / MANIFEST_NAME)) == len(records) + 2
    # changed settings: everything runs again, replacing this tool's outputs without --overwrite
    assert main([*args, "--scale", "3"]) == 1
    assert "3 done, 1 failed" in capsys.readouterr().err
    with Image.open(out / "a_tileup.png") as image:
        assert image.size == (96, 96)


def test_existing_files_not_in_the_manifest_need_overwrite_or_skip_existing(
    tmp_path: Path, shots: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (shots / "b.png").unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_tileup.png").write_bytes(b"precious")
    assert main([str(shots), "-o", str(out), *FAST]) == 2
    assert "a_tileup.png: already exists" in capsys.readouterr().err
    assert not (out / MANIFEST_NAME).exists()  # nothing done, nothing recorded
    assert (
        main(["batch", str(shots), "-o", str(out), "--skip-existing", "--upscaler", "lanczos"]) == 0
    )
    assert (out / "a_tileup.png").read_bytes() == b"precious"
    assert "1 done, 0 failed, 1 skipped (done before)" in capsys.readouterr().err
    assert (out / "c_tileup.png").is_file()
    # --no-manifest: nothing read, nothing written
    fresh = tmp_path / "fresh"
    assert main(["batch", str(shots), "-o", f"{fresh}/", "--no-manifest", *FAST]) == 0
    assert sorted(p.name for p in fresh.iterdir()) == ["a_tileup.png", "c_tileup.png"]


def test_interrupted_run_resumes(tmp_path: Path, shots: Path) -> None:
    (shots / "b.png").unlink()
    out = tmp_path / "out"
    settings = UpscaleSettings(upscaler="lanczos")
    seen: list[str] = []

    def stop_after_first(outcome: tileup.FileOutcome) -> None:
        seen.append(outcome.source.name)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tileup.upscale_files(
            [str(shots)], settings, output=f"{out}/", recursive=True, on_outcome=stop_after_first
        )
    assert seen == ["a.png"]
    first = stamps(out)
    assert list(first) == ["a_tileup.png"]
    # what a kill leaves: c's output written but not recorded, d's temporary file
    (out / "c_tileup.png").write_bytes(b"written, not recorded")
    (out / "sub").mkdir()
    stray = out / "sub" / ".d_tileup.png.tmp-x1y2"
    stray.write_bytes(b"half")
    again = tileup.upscale_files([str(shots)], settings, output=f"{out}/", recursive=True)
    assert [(o.source.name, o.skipped, o.error) for o in again] == [
        ("a.png", True, None), ("c.png", False, None), ("d.png", False, None)
    ]  # fmt: skip
    assert again.written == [out / "c_tileup.png", out / "sub" / "d_tileup.png"]
    assert stamps(out)["a_tileup.png"] == first["a_tileup.png"]
    assert not stray.exists()
    with Image.open(out / "c_tileup.png") as image:
        assert image.size == (64, 64)
    done = [r for r in read_manifest(out / MANIFEST_NAME) if r.status == "done"]
    assert sorted(r.output for r in done) == ["a_tileup.png", "c_tileup.png", "sub/d_tileup.png"]


def test_deleted_output_is_made_again(tmp_path: Path, shots: Path) -> None:
    (shots / "b.png").unlink()
    out = tmp_path / "out"
    settings = UpscaleSettings(upscaler="lanczos")
    tileup.upscale_files([str(shots)], settings, output=f"{out}/").raise_for_errors()
    (out / "c_tileup.png").unlink()
    again = tileup.upscale_files([str(shots)], settings, output=f"{out}/")
    assert [(o.source.name, o.skipped) for o in again] == [("a.png", True), ("c.png", False)]
    assert (out / "c_tileup.png").is_file()
