"""Write-then-rename: an interrupted write leaves the old output or none, never half of one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.core.atomic import atomic_dir, atomic_file, read_json, read_table, write_json
from pipeline.core.errors import PipelineError, first_line
from pipeline.core.paths import resolve_user_path


def test_failed_dir_write_keeps_the_old_output_and_no_temp(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as temp:
        (temp / "a.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(target) as temp:
            (temp / "a.txt").write_text("half")
            raise ValueError("killed")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_successful_write_replaces_whole_folder(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as temp:
        (temp / "stale.txt").write_text("x")
    with atomic_dir(target) as temp:
        (temp / "new.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_atomic_file_and_json(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": 2})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    with pytest.raises(KeyError):
        with atomic_file(tmp_path / "m.json") as temp:
            temp.write_text("partial")
            raise KeyError
    assert '"a": 2' in (tmp_path / "m.json").read_text()
    assert read_json(tmp_path / "m.json", "missing") == {"a": 2, "b": 1}
    for text, error in (("[1, 2]", r"m\.json: expected a JSON object, got list"), ("{", r"m\.json: not valid JSON")):
        (tmp_path / "m.json").write_text(text)
        with pytest.raises(PipelineError, match=error):
            read_json(tmp_path / "m.json", "missing")
    with pytest.raises(PipelineError, match=r"gone\.json: run the stage$"):
        read_json(tmp_path / "gone.json", "run the stage")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_writer_leaves_no_partial_output(tmp_path, sig):
    script = textwrap.dedent(
        f"""
        import time
        from pipeline.core.atomic import atomic_dir
        with atomic_dir({str(tmp_path / 'out')!r}) as temp:
            (temp / 'part1').write_text('x')
            print('started', flush=True)
            time.sleep(60)
            (temp / 'part2').write_text('y')
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert not (tmp_path / "out").exists()
    with atomic_dir(tmp_path / "out") as temp:  # SIGKILL leaves the hidden temp folder; the next write sweeps it
        (temp / "part1").write_text("z")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_read_table_gives_strings_and_one_line_errors(tmp_path):
    table = tmp_path / "split.csv"
    with pytest.raises(PipelineError, match=r"split\.csv: split table not found; run prepare$"):
        read_table(table, ["path"], "split table not found; run prepare")
    table.write_text("image_id,path,mask_path\nISIC_1,a.jpg,\nISIC_2,b.jpg,m.png\n")
    frame = read_table(table, ["image_id", "path"], "missing")
    assert frame.to_dict("list") == {"image_id": ["ISIC_1", "ISIC_2"], "path": ["a.jpg", "b.jpg"], "mask_path": ["", "m.png"]}
    with pytest.raises(PipelineError, match=r"split\.csv: lacks column 'dx' \(has image_id, path, mask_path\)"):
        read_table(table, ["image_id", "dx"], "missing")
    table.write_bytes(b"")
    with pytest.raises(PipelineError, match=r"split\.csv: unreadable CSV \(No columns to parse from file\)"):
        read_table(table, ["path"], "missing")


def test_first_line_of_a_library_error():
    assert first_line(ValueError("\n  shape mismatch  \nsecond line")) == "shape mismatch"
    assert first_line(KeyError()) == "KeyError"  # no message: a bare splitlines()[0] would raise IndexError
    assert first_line(OSError("x" * 500), limit=10) == "x" * 10


def test_relative_paths_cannot_escape_the_data_folders(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert resolve_user_path("data/HAM10000", "data.source") == tmp_path / "data" / "HAM10000"
    with pytest.raises(PipelineError, match="data.source: relative path '../../etc' leaves"):
        resolve_user_path("../../etc", "data.source")
    assert str(resolve_user_path("/abs/HAM10000", "data.source")) == "/abs/HAM10000"
