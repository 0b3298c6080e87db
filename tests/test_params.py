"""The typed params loader: good files load, every bad one fails with one line naming the key."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from pipeline.core.cli import run_stage
from pipeline.core.errors import PipelineError
from pipeline.core.params import CLASS_NAMES, load_params, parse_params

REPO_PARAMS = yaml.safe_load(open("params.yaml"))


def with_change(path: str, value) -> dict:
    raw = copy.deepcopy(REPO_PARAMS)
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return raw


def test_repo_params_load_and_match_defaults():
    params = load_params("params.yaml")
    assert params.data.classes == ["akiec", "bcc", "df", "mel", "vasc"]
    assert params.diffusion.method == "lora"
    assert params.generate.scheduler == "dpmsolver++"
    assert params.classifier.arch == "efficientnet_b0"


def test_learning_rate_follows_the_method():
    per_method = {"lora": 1e-2, "dreambooth": 2e-4, "textual_inversion": 5e-3}
    for method, rate in per_method.items():
        params = parse_params({"diffusion": {"method": method, "lr": per_method}})
        assert params.diffusion.learning_rate == rate
    assert parse_params({"diffusion": {"method": "dreambooth", "lr": 3e-4}}).diffusion.learning_rate == 3e-4


def test_class_prompt_uses_a_distinct_token_per_class():
    params = parse_params({})
    prompts = {c: params.class_prompt(c) for c in CLASS_NAMES}
    tokens = {params.instance_token(c) for c in CLASS_NAMES}
    assert len(tokens) == len(CLASS_NAMES)
    assert prompts["vasc"] == f"a dermoscopic image of {params.instance_token('vasc')} vascular lesion"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("data.clases", ["mel", "vasc"], "unknown key 'data.clases'"),
        ("bogus_section", {}, "unknown key 'bogus_section'"),
        ("classifier.epochs", "eight", "classifier.epochs"),
        ("data.classes", "mel", "data.classes"),
        ("data.classes", ["mel", "xyz"], "data.classes.1: Input should be 'akiec'"),
        ("data.classes", ["mel", "mel", "vasc"], "duplicate class code 'mel'"),
        ("data.classes", ["mel"], "at least 2 items"),
        ("data.split.val", 0.0, "data.split.val"),
        ("data.split.test", 1.5, "data.split.test"),
        ("data.split", {"val": 0.6, "test": 0.5}, "val + test must be < 1"),
        ("data.finetune_images", 0, "data.finetune_images"),
        ("demo.images", -5, "demo.images"),
        ("generate.per_class", -1, "generate.per_class"),
        ("diffusion.method", "controlnet", "diffusion.method"),
        ("diffusion.prompt", "a photo of {class_name}", "must contain '{token}'"),
        ("classifier.balance", "oversample", "classifier.balance"),
        ("classifier.seeds", [], "classifier.seeds"),
        ("data.on_bad_image", "ignore", "data.on_bad_image"),
        ("diffusion.lr", {"dreambooth": 1e-4}, "lr has no rate for method 'lora'"),
        ("diffusion.lr", -1.0, "learning rates must be > 0"),
        ("diffusion.lr", {"lora": 1e-2, "controlnet": 1e-3}, "diffusion.lr"),
        ("sweep.amounts", [0, 50], "amounts must be distinct and > 0"),
        ("sweep.methods", ["gan"], "sweep.methods"),
        ("sweep.jobs", 0, "sweep.jobs"),
    ],
)
def test_bad_params_fail_with_one_line_naming_the_key(path, value, expected):
    with pytest.raises(PipelineError) as caught:
        parse_params(with_change(path, value))
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith("params.yaml: ")


def test_unquoted_no_survives_dvc_rewriting_params(tmp_path):
    """`dvc exp run -S` rewrites params.yaml and drops the quotes: `mixed_precision: no` reads as False."""
    rewritten = tmp_path / "params.yaml"
    rewritten.write_text(yaml.safe_dump(REPO_PARAMS).replace("mixed_precision: 'no'", "mixed_precision: no"))
    assert "mixed_precision: no\n" in rewritten.read_text()
    assert load_params(rewritten).compute.mixed_precision == "no"
    with pytest.raises(PipelineError, match="compute.mixed_precision"):
        parse_params(with_change("compute.mixed_precision", True))


def test_invalid_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("data: {classes: [mel, vasc\n")
    with pytest.raises(PipelineError, match=r"params.yaml: line \d+ is not valid YAML"):
        load_params(broken)
    with pytest.raises(PipelineError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    top_level_list = tmp_path / "list.yaml"
    top_level_list.write_text("- 1\n- 2\n")
    with pytest.raises(PipelineError, match="expected a mapping"):
        load_params(top_level_list)


def test_stage_wrapper_prints_one_error_line_and_exits_nonzero(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(with_change("data.classes", ["mel", "zzz"])))
    called = []
    code = run_stage("prepare", lambda params: called.append(params), track=False, argv=["--params", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and not called
    assert err == [f"error: prepare: {bad}: data.classes.1: Input should be 'akiec', 'bcc', 'bkl', 'df', 'mel', 'nv' "
                   "or 'vasc' (got 'zzz')"]


def test_stage_wrapper_passes_the_foreach_item(tmp_path):
    good = tmp_path / "params.yaml"
    good.write_text(yaml.safe_dump(REPO_PARAMS))
    seen = []
    code = run_stage("finetune", lambda p, c: seen.append(c), item="class_code", track=False,
                     argv=["mel", "--params", str(good)])
    assert code == 0 and seen == ["mel"]


def test_only_rank_zero_opens_a_tracking_run(tmp_path, monkeypatch):
    good = tmp_path / "params.yaml"
    good.write_text(yaml.safe_dump(REPO_PARAMS))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    ran = []
    assert run_stage("generate", lambda p, c: ran.append(c), item="class_code", argv=["df", "--params", str(good)]) == 0
    assert ran == ["df"] and not (tmp_path / "never.db").exists()


def test_the_done_line_reports_the_torch_threads_the_stage_ran_on(tmp_path, capsys):
    """Machines of one kind differ; the done line shows whether a slow stage ran on fewer threads."""
    import torch

    good = tmp_path / "params.yaml"
    good.write_text(yaml.safe_dump(REPO_PARAMS))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert run_stage("prepare", lambda params: None, track=False, argv=["--params", str(good)]) == 0
    finally:
        torch.set_num_threads(before)
    assert re.fullmatch(r"prepare: done in [\d.]+ s, 1 torch thread\(s\)", capsys.readouterr().out.strip())
