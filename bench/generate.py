"""Generation throughput and quality: the project's generate path vs the plain one-image-at-a-time pipeline call.

ours       ``pipeline.diffusion.generate.generate_class`` (the generate@<class> stage body): LoRA fused into the
           UNet, DPM-Solver++ at ``generate.steps`` (20), ``generate.batch`` (16) images per call, PNGs + manifest.
reference  ``StableDiffusionPipeline.from_pretrained`` + ``load_lora_weights`` (not fused), the scheduler the
           base model ships, 50 steps, one ``pipe(prompt)`` call per image, ``image.save``.
Both arms: same base + LoRA, same prompt, guidance (from the fine-tuned UNet alone: ``generate.unconditional:
finetuned``), resolution, per-image seeds, thread count; wall time
includes loading. Quality proxy: FID and mean-feature distance of each arm's images to the class's real
fine-tune images, in the feature space of a fixed random-init EfficientNet-B0 (and of the repository's
trained baseline classifier when it exists).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import workspace as ws
from bench.common import (
    REPO,
    BenchResult,
    Settings,
    enter_workspace,
    fmt,
    primary_ratio,
    ratio,
    run_arm,
    table,
    target,
    workspace_env,
)


BOOTSTRAP = 200


def _params(per_class: int, steps: int, batch: int, resolution: int):
    from pipeline.core.params import parse_params

    # unconditional finetuned: guidance from the fine-tuned UNet alone, as the reference's pipeline call does.
    return parse_params({"diffusion": {"resolution": resolution},
                         "generate": {"per_class": per_class, "steps": steps, "batch": batch, "unconditional": "finetuned"}})


def ours_child(workspace: str, class_code: str, images: int, steps: int, batch: int, resolution: int) -> dict:
    from pipeline.diffusion.generate import generate_class

    enter_workspace(workspace)
    params = _params(images, steps, batch, resolution)
    start = time.perf_counter()
    cpu = time.process_time()
    folder = generate_class(params, class_code)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    files = sorted(str(p) for p in folder.glob(f"{class_code}_*.png"))
    return {"images": len(files), "wall_s": wall, "cpu_s": cpu, "images_per_s": len(files) / wall,
            "images_per_cpu_s": len(files) / cpu, "files": files, "scheduler": params.generate.scheduler,
            "steps": steps, "batch": batch}


def reference_child(base: str, lora_dir: str, out: str, class_code: str, images: int, steps: int, resolution: int) -> dict:
    """diffusers' quick-start: from_pretrained, load_lora_weights, then one pipe(prompt) call per image."""
    import torch
    from diffusers import StableDiffusionPipeline

    from pipeline.diffusion.generate import image_seed
    from pipeline.diffusion.lora import LORA_FILE
    from pipeline.core.params import parse_params

    params = parse_params({"diffusion": {"resolution": resolution}})
    prompt = params.class_prompt(class_code)
    start = time.perf_counter()
    cpu = time.process_time()
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, use_safetensors=True)
    pipe.load_lora_weights(lora_dir, weight_name=LORA_FILE)
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(images):
        generator = torch.Generator().manual_seed(image_seed(params.seed, class_code, k))
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=params.generate.guidance, generator=generator,
                     height=resolution, width=resolution).images[0]
        path = out_dir / f"{class_code}_{k:05d}.png"
        image.save(path)
        files.append(str(path))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"images": len(files), "wall_s": wall, "cpu_s": cpu, "images_per_s": len(files) / wall,
            "images_per_cpu_s": len(files) / cpu, "files": files, "scheduler": type(pipe.scheduler).__name__,
            "steps": steps, "batch": 1}


def quality_child(real: list[str], arms: dict[str, list[str]], size: int, workspace: str) -> dict:
    """FID and ||mean_real - mean_fake|| per arm, per feature extractor (random-init EfficientNet-B0, trained baseline).

    Features go through the screen stage's ``feature_space`` (ranks among the real images), so the figures are the stage's.
    """
    import numpy as np
    import torch

    from pipeline.classifier.augment import normalize
    from pipeline.classifier.model import create_classifier
    from pipeline.quality.features import ClassifierFeatures, feature_space, load_arrays, load_baseline_classifier
    from pipeline.quality.metrics import frechet_distance

    enter_workspace(workspace)  # the decode cache lands in the throw-away workspace
    real_images = load_arrays(real, size)
    torch.manual_seed(0)
    random_net = create_classifier("efficientnet_b0", 5, pretrained=False)
    # A random network's BatchNorm at init passes activations through unscaled and they vanish with depth;
    # calibrating its running statistics on the real images (no training) gives well-scaled random features.
    for module in random_net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # timm's BatchNormAct2d included
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    random_net.train()
    with torch.no_grad():
        random_net(normalize(real_images))
    extractors = {"random_init_efficientnet_b0": ClassifierFeatures([random_net.eval()], ["c"] * 5, size)}
    baseline = REPO / "models" / "classifier" / "baseline"
    if (baseline / "config.json").is_file():
        try:
            extractors["trained_baseline_classifier"] = load_baseline_classifier(baseline)
        except Exception as exc:  # a half-written model folder from a concurrent run: skip it, say so
            print(f"baseline classifier not usable: {exc}")
    out: dict = {}
    for name, extractor in extractors.items():
        raw = [extractor(load_arrays(files, extractor.input_size)) for files in (real, *arms.values())]
        feats = dict(zip(("real", *arms), (f.numpy() for f in feature_space(*raw))))
        out[name] = {arm: {"fid": frechet_distance(feats["real"], f),
                           "mean_feature_distance": float(np.linalg.norm(feats["real"].mean(0) - f.mean(0)))}
                     for arm, f in feats.items() if arm != "real"}
        # Paired bootstrap of the FID ratio: resample image indices (same seeds in both arms) and the real set.
        rng = np.random.default_rng(0)
        n, m, ratios = len(feats["ours"]), len(feats["real"]), []
        for _ in range(BOOTSTRAP):
            idx, ridx = rng.integers(0, n, n), rng.integers(0, m, m)
            real_b = feats["real"][ridx]
            ratios.append(frechet_distance(real_b, feats["ours"][idx]) / max(1e-12, frechet_distance(real_b, feats["reference"][idx])))
        out[name]["fid_ratio_ci90"] = [float(np.quantile(ratios, 0.05)), float(np.quantile(ratios, 0.95))]
    out["real_images"] = len(real)
    return out


def run(settings: Settings) -> BenchResult:
    quick = settings.quick
    images = 2 if quick else 32  # two full batches of ours: its fixed costs (loading, grid) are amortised as in a stage
    ours_steps, ref_steps, batch = (2, 4, 16) if quick else (20, 50, 16)
    base, lora_dir, how, resolution = ws.trained_models(settings, ws.BENCH_CLASS)
    rows = ws.finetune_rows(settings, ws.BENCH_CLASS)
    workspace = ws.diffusion_workspace(settings.workdir / "ws-generate", base, rows, class_model=lora_dir)
    ref_out = settings.workdir / "generate-reference"
    env = workspace_env(workspace)
    ours = run_arm(settings, "generate-ours", "bench.generate:ours_child",
                   {"workspace": str(workspace), "class_code": ws.BENCH_CLASS, "images": images, "steps": ours_steps,
                    "batch": batch, "resolution": resolution}, env=env)
    print(f"  generate ours: {ours.result['images_per_s']:.3f} images/s, peak {ours.peak_rss_mib:.0f} MiB", flush=True)
    ref = run_arm(settings, "generate-reference", "bench.generate:reference_child",
                  {"base": str(base), "lora_dir": str(lora_dir), "out": str(ref_out), "class_code": ws.BENCH_CLASS,
                   "images": images, "steps": ref_steps, "resolution": resolution}, env=env)
    print(f"  generate reference: {ref.result['images_per_s']:.3f} images/s, peak {ref.peak_rss_mib:.0f} MiB", flush=True)
    quality = run_arm(settings, "generate-quality", "bench.generate:quality_child",
                      {"real": [r["path"] for r in rows], "arms": {"ours": ours.result["files"], "reference": ref.result["files"]},
                       "size": 64, "workspace": str(workspace)}, env=env).result

    o, r = ours.as_dict(), ref.as_dict()
    for d in (o, r):
        d.pop("files", None)
    result = BenchResult("generate")
    rate_ratio = ratio(o["images_per_s"], r["images_per_s"])
    cpu_ratio = ratio(o["images_per_cpu_s"], r["images_per_cpu_s"])
    result.data = {"settings": {"images": images, "resolution": resolution, "class": ws.BENCH_CLASS, "models": how,
                                "ours": f"{o['scheduler']} {ours_steps} steps, batch {batch}, LoRA fused",
                                "reference": f"{r['scheduler']} {ref_steps} steps, one image per call, LoRA not fused"},
                   "ours": o, "reference": r, "ratio_images_per_s": rate_ratio, "ratio_images_per_cpu_s": cpu_ratio,
                   "ratio_peak_rss": ratio(o["peak_rss_mib"], r["peak_rss_mib"]), "quality": quality}
    rows_out = [
        ["ours", f"{o['scheduler']} x{ours_steps}, batch {batch}, fused", o["wall_s"], o["images_per_s"], o["images_per_cpu_s"], o["peak_rss_mib"], rate_ratio, cpu_ratio],
        ["reference", f"{r['scheduler']} x{ref_steps}, 1 per call, unfused", r["wall_s"], r["images_per_s"], r["images_per_cpu_s"], r["peak_rss_mib"], 1.0, 1.0],
    ]
    result.tables.append((f"Generation, {images} images of {ws.BENCH_CLASS} at {resolution}px (wall includes loading)",
                          table(["arm", "sampler", "wall s", "images/s", "images/CPU-s", "peak RSS MiB", "images/s ours/ref", "CPU-based ours/ref"], rows_out)))
    qrows, qratios = [], {}
    for extractor, arms in quality.items():
        if not isinstance(arms, dict):
            continue
        fid_ratio = ratio(arms["ours"]["fid"], arms["reference"]["fid"])
        low, high = arms.get("fid_ratio_ci90", [None, None])
        qratios[extractor] = (fid_ratio, low, high)
        for arm in ("ours", "reference"):
            qrows.append([extractor, arm, arms[arm]["fid"], arms[arm]["mean_feature_distance"], fid_ratio if arm == "ours" else 1.0,
                          f"{fmt(low)} - {fmt(high)}" if arm == "ours" and low is not None else ""])
    result.tables.append((f"Quality proxy vs the {quality['real_images']} real fine-tune images (lower is closer)",
                          table(["features", "arm", "FID", "mean-feature dist", "FID ours/ref", "90% bootstrap"], qrows)))
    judged, basis = primary_ratio(settings, rate_ratio, cpu_ratio)
    result.targets.append(target("images/s ours/reference", judged, 3.0, note=basis))
    for extractor, (q, low, high) in qratios.items():
        result.targets.append(target(f"FID ours/reference ({extractor})", q, 1.10, higher_is_better=False,
                                     note=f"at most 10% further from the real images than the reference; paired bootstrap "
                                          f"90% interval {fmt(low)} - {fmt(high)}"))
    result.notes += [
        f"Models: {how}.",
        f"FID on {images} generated vs {quality['real_images']} real images is biased upwards by the small samples; both arms "
        "share that bias (same counts, same per-image seeds), so the ratio is the comparison, not the absolute value.",
    ]
    return result
