"""dvc.yaml's deps cannot go stale: every project module a stage's command loads is covered by that stage's deps.

A module a stage imports but does not depend on is a module whose edits `dvc repro` ignores (it keeps the stale
outputs). The modules are found the way `python -m stages.<name>` loads them from the repository root, including
imports made inside functions, which only run later. Params listed key by key are checked too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from modulefinder import ModuleFinder
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

from pipeline.core.params import ClassifierParams, DiffusionParams

REPO = Path(__file__).resolve().parents[1]


def entry_modules(cmd: str, root: Path) -> list[str]:
    """The project modules a stage's command runs: each `-m <module>` (python, accelerate launch) and each
    `stages.<x>` / `pipeline.<x>` argument a launcher module is given to run."""
    words = shlex.split(cmd)
    named = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-m"]
    named += [word for word in words if re.fullmatch(r"(stages|pipeline)(\.\w+)+", word)]
    project = [m for m in dict.fromkeys(named) if (root / m.split(".")[0]).is_dir()]
    assert project, f"no project module found in the command {cmd!r}"
    return project


def loaded_files(modules: list[str], root: Path) -> set[Path]:
    """Project files Python loads to run these modules from ``root``: them, their packages' __init__.py and every
    project module they import, at module level or inside a function. Only ``root`` is searched, so third-party
    and standard-library imports are not followed."""
    finder = ModuleFinder(path=[str(root)])
    for module in modules:
        finder.import_hook(module)
    return {Path(m.__file__).resolve() for m in finder.modules.values() if m.__file__}


def uncovered(stage, root: Path) -> list[str]:
    """Files the stage's command loads that none of its deps (a file or a folder holding it) covers."""
    deps = [Path(dep.fs_path).resolve() for dep in stage.deps]
    files = loaded_files(entry_modules(stage.cmd, root), root)
    return sorted(str(f.relative_to(root)) for f in files if not any(f == d or d in f.parents for d in deps))


def stages_of(root: Path) -> list:
    with Repo(str(root)) as repo:
        return list(repo.index.stages)


def test_every_stage_depends_on_every_project_module_it_loads():
    stages = stages_of(REPO)
    assert len(stages) >= 9
    missing = {stage.name: files for stage in stages if (files := uncovered(stage, REPO))}
    assert not missing, f"add these to the stage's deps in dvc.yaml (or their folder): {missing}"


def test_the_check_fails_when_a_stage_loses_a_folder_dep(tmp_path):
    """The same check on a copy of the repo whose finetune stage no longer depends on pipeline/diffusion."""
    Repo.init(str(tmp_path), no_scm=True).close()
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = pipeline["stages"]["finetune"]["do"]["deps"]
    assert "pipeline/diffusion" in deps
    deps.remove("pipeline/diffusion")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))

    by_name = {stage.name: uncovered(stage, tmp_path.resolve()) for stage in stages_of(tmp_path)}
    assert "pipeline/diffusion/finetune.py" in by_name["finetune@mel"]
    assert all(f.startswith("pipeline/diffusion/") for f in by_name["finetune@mel"])
    assert by_name["generate@mel"] == [] and by_name["train@baseline"] == []


@pytest.mark.parametrize(("stage", "section", "fields", "unread"), [
    # The oracle's own seeds and epochs replace the classifier's, it never reads equal_steps, and checkpoint_minutes
    # does not change weights.
    ("oracle", "classifier", ClassifierParams.model_fields, {"seeds", "epochs", "equal_steps", "checkpoint_minutes"}),
    ("finetune", "diffusion", DiffusionParams.model_fields, {"control", "controlnet"}),  # the controlnet stage's
])
def test_a_stage_listing_keys_depends_on_every_key_it_reads(stage, section, fields, unread):
    """A stage that lists a section's keys one by one must list every key but those it does not read, a new one too,
    and each must be in params.yaml (DVC refuses a listed key the file lacks)."""
    entry = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    params = entry.get("do", entry)["params"]
    listed = {key.removeprefix(f"{section}.") for key in params if key.startswith(f"{section}.")}
    assert section not in params
    assert listed == set(fields) - unread
    assert listed <= set(yaml.safe_load((REPO / "params.yaml").read_text())[section])


def test_static_scan_sees_at_least_what_python_really_imports():
    """Import a stage's module in a fresh interpreter, as `python -m` would before running it: every project module
    in sys.modules is among the files the scan above found (the scan also follows imports inside functions)."""
    module = "stages.prepare"  # the lightest stage to import; the scan is the same code for all of them
    code = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
            "print('\\n'.join(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", code, module], cwd=REPO, capture_output=True, text=True, check=True)
    files = [Path(f) for f in out.stdout.split("\n") if f.startswith("/")]  # torch names a few modules relatively
    project = [REPO / "pipeline", REPO / "stages"]  # not .venv, which `make` creates inside the repository
    imported = {f.resolve() for f in files if any(folder in f.resolve().parents for folder in project)}
    assert Path(REPO / "pipeline/data/split.py").resolve() in imported
    assert imported <= loaded_files([module], REPO), imported - loaded_files([module], REPO)


@pytest.mark.parametrize("cmd, expected", [
    ("python -m stages.train baseline", ["stages.train"]),
    ("accelerate launch --num_processes 2 -m stages.finetune mel", ["stages.finetune"]),
    ("python -m pipeline.core.launch stages.generate vasc", ["pipeline.core.launch", "stages.generate"]),
])
def test_entry_modules_follow_launchers(cmd, expected):
    assert entry_modules(cmd, REPO) == expected


def test_a_stage_under_a_python_without_the_dependencies_says_how_to_fix_it():
    """`dvc repro` outside the venv runs stages with the first `python` on PATH; `-S` (no site-packages) stands in
    for one that lacks the project's packages."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", "-m", "stages.prepare"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: this Python ({sys.executable}) lacks lesion-synth's dependencies (no module 'yaml'); "
        "run '. .venv/bin/activate' (make install) first"
    ]
