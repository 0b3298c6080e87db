"""Class fidelity: did the generator learn the class? An oracle classifier judges each class's synthetic images.

The oracle is the project's EfficientNet-B0, trained by ``train_variant`` (one judge per seed of ``oracle.seeds``,
``oracle.epochs`` of ``oracle.epoch_images`` draws) on every real train and reserve row, never a val, test or
synthetic image. Per class and source (``augmented``: data/synthetic, ``base_only``: data/synthetic_base) the
``fidelity`` stage reports the share of images it assigns to their own class and its mean p(own class), beside its
recall on the class's real test images, so a low fidelity can be told from an oracle that cannot recognise the class.
Several judges are averaged in probability: one judge trained from scratch can swing a class's verdict on the same
synthetic images by more than it swings on real ones, and ``judges`` in reports/fidelity.json shows how far they agree.
"""

from __future__ import annotations

import numpy as np

from pipeline.core import tracking
from pipeline.core.atomic import write_json
from pipeline.classifier.dataset import assert_real_heldout, load_images, read_split, real_samples, synthetic_samples
from pipeline.classifier.model import load_classifier, predict_proba, read_config
from pipeline.classifier.train import ORACLE, train_variant
from pipeline.core.errors import PipelineError
from pipeline.core.params import Params
from pipeline.core.paths import CLASSIFIER_DIR, REPORTS_DIR, SYNTHETIC_BASE_DIR, SYNTHETIC_DIR, workspace_root

FIDELITY_JSON = REPORTS_DIR / "fidelity.json"
SOURCES = {"augmented": SYNTHETIC_DIR, "base_only": SYNTHETIC_BASE_DIR}  # source -> folder of its images


def train_oracle(params: Params) -> dict:
    """The `oracle` stage: models/classifier/oracle and reports/train/oracle.json, one judge per seed of oracle.seeds."""
    c, o = params.classifier, params.oracle
    classifier = c.model_copy(update={"seeds": o.seeds, "epochs": o.epochs, "min_epochs": min(c.min_epochs, o.epochs)})
    return train_variant(params.model_copy(update={"classifier": classifier}), ORACLE)


def own_class_scores(labels: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """Per class with images: the share predicted as their own class and the mean p(own class). On real test images
    the share is the class's recall."""
    out = {}
    for index, class_code in enumerate(classes):
        mine = labels == index
        if mine.any():
            out[class_code] = {
                "share_own_class": float((proba[mine].argmax(axis=1) == index).mean()),
                "mean_p_own_class": float(proba[mine, index].mean()),
                "images": int(mine.sum()),
            }
    return out


def fidelity_table(test: dict[str, dict], sources: dict[str, dict[str, dict]], classes: list[str]) -> dict:
    """reports/fidelity.json's content from ``own_class_scores`` of the real test images and of each source."""
    chance = 1 / len(classes)
    per_class, warnings = {}, []
    for class_code in classes:
        recall = test.get(class_code, {}).get("share_own_class")
        entry = {"oracle_test_recall": recall, "test_images": test.get(class_code, {}).get("images", 0)}
        for source, scores in sources.items():
            if class_code not in scores:
                raise PipelineError(f"{SOURCES[source] / class_code}: no synthetic image of class {class_code!r} to score")
            entry[source] = {k: scores[class_code][k] for k in ("share_own_class", "mean_p_own_class", "images")}
        per_class[class_code] = entry
        if recall is None:
            warnings.append(f"{class_code}: no real test image, so the oracle's own recall is unknown")
        elif recall <= chance:
            warnings.append(f"{class_code}: the oracle recognises only {recall:.0%} of the real test images (chance "
                            f"{chance:.0%}), so its fidelity figures for {class_code} say little")
    mean = {source: {key: float(np.mean([per_class[c][source][key] for c in classes]))
                     for key in ("share_own_class", "mean_p_own_class")} for source in sources}
    recalls = [per_class[c]["oracle_test_recall"] for c in classes if per_class[c]["oracle_test_recall"] is not None]
    mean["oracle_test_recall"] = float(np.mean(recalls)) if recalls else None
    return {"classes": per_class, "mean": mean, "warnings": warnings,
            "fine_tuning_adds": mean["augmented"]["share_own_class"] - mean["base_only"]["share_own_class"]}


def fidelity_lines(table: dict) -> list[str]:
    """Plain words for the summary: how often the oracle recognises each source's images as their own class."""
    mean = table["mean"]
    words = {"augmented": "the fine-tuned models' images", "base_only": "the base model's images (class prompt, no fine-tuning)"}
    parts = [f"{mean[s]['share_own_class']:.0%} of {words[s]}" for s in SOURCES if s in mean]
    recall = mean.get("oracle_test_recall")
    real = f", and {recall:.0%} of real test images (its recall)" if recall is not None else ""
    lines = [f"Class fidelity: an oracle classifier trained on every real train image assigns {' and '.join(parts)} "
             f"to their own class{real}."]
    judges = table.get("oracle", {}).get("judges", {})
    if len(judges) > 1:
        shares = ", ".join(f"{j['augmented']:.0%}" for j in judges.values())
        lines.append(f"The oracle averages {len(judges)} judges (oracle.seeds); alone, they assign {shares} of the "
                     "fine-tuned models' images to their own class.")
    return lines + [f"Warning: {w}." for w in table.get("warnings", [])]


def score_fidelity(params: Params) -> dict:
    """The `fidelity` stage: score each source's images with the oracle; write reports/fidelity.json, log to MLflow."""
    root = workspace_root()
    classes = list(params.data.classes)
    folder = root / CLASSIFIER_DIR / ORACLE
    config = read_config(folder)
    seeds, size = [int(seed) for seed in config["seeds"]], int(config["image_size"])
    judges = [load_classifier(folder, seed, classes) for seed in seeds]

    def judged(samples) -> tuple[np.ndarray, np.ndarray]:
        """The samples' labels and every judge's probabilities, (judges, images, classes)."""
        images = load_images([s.path for s in samples], size)
        return np.array([s.label for s in samples]), np.stack([predict_proba(judge, images) for judge in judges])

    split = read_split(params, root)
    test = real_samples(split, "test")
    assert_real_heldout(test, split, "test", root / SYNTHETIC_DIR)
    sets = {"test": judged(test), **{s: judged(synthetic_samples(params, root, d)) for s, d in SOURCES.items()}}
    scores = {name: own_class_scores(labels, proba.mean(axis=0), classes) for name, (labels, proba) in sets.items()}
    table = fidelity_table(scores.pop("test"), scores, classes)

    def mean_share(labels: np.ndarray, proba: np.ndarray) -> float:
        return float(np.mean([v["share_own_class"] for v in own_class_scores(labels, proba, classes).values()]))

    # Each judge alone: its mean share of each set's images in their own class (on "test", its mean recall).
    alone = {str(seed): {name: mean_share(labels, proba[j]) for name, (labels, proba) in sets.items()}
             for j, seed in enumerate(seeds)}
    table["oracle"] = {"seeds": seeds, "image_size": size, "test_images": len(test), "judges": alone}
    write_json(root / FIDELITY_JSON, table)
    metrics = {"oracle_test_recall_mean": table["mean"]["oracle_test_recall"]}
    metrics.update({f"fidelity_{source}_mean": table["mean"][source]["share_own_class"] for source in SOURCES})
    for class_code, entry in table["classes"].items():
        metrics[f"oracle_test_recall_{class_code}"] = entry["oracle_test_recall"]
        for source in SOURCES:
            metrics[f"fidelity_{source}_{class_code}"] = entry[source]["share_own_class"]
            metrics[f"p_own_class_{source}_{class_code}"] = entry[source]["mean_p_own_class"]
    tracking.log_metrics({k: v for k, v in metrics.items() if v is not None})  # None: a class without test images
    tracking.log_artifact(root / FIDELITY_JSON)
    print("\n".join(fidelity_lines(table)) + f"\nPer class: {root / FIDELITY_JSON} (and reports/summary.md)")
    return table
