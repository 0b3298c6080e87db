"""How fine-tuning and generation cost grow with resolution, fine-tune images and images generated.

Three points per axis, the project's own code paths (``finetune_class`` with LoRA, ``generate_class``) on an
untrained tiny base (cost does not depend on the weights). Both wall and process-CPU seconds are recorded; with
one torch thread CPU seconds are what an idle core would take. Linear fits give per-unit costs to predict a
real run; the plot is reports/bench_scaling.png.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import workspace as ws
from bench.common import BenchResult, Settings, enter_workspace, report_paths, run_arm, table

RESOLUTIONS = (32, 48, 64)
FINETUNE_IMAGES = (5, 10, 20)
GENERATED = (8, 16, 32)


def _finetune_point(root: Path, rows: list[dict], resolution: int, steps: int) -> dict:
    from bench.finetune import _params, instrumented_finetune

    ws.write_csv(root / "data" / "prepared" / "finetune" / f"{ws.BENCH_CLASS}.csv", rows, ws.FINETUNE_COLUMNS)
    params = _params("lora", steps, resolution, 4, ws.BENCH_CLASS)
    cpu = time.process_time()
    out = instrumented_finetune(params, ws.BENCH_CLASS, with_mlflow=False, warmup=2)
    out["cpu_s"] = time.process_time() - cpu
    out["s_per_step"] = 1 / out["steps_per_s"]
    out["cpu_s_per_step"] = 1 / out["steps_per_cpu_s"]
    return out


def _generate_point(resolution: int, images: int, steps: int) -> dict:
    from bench.generate import _params
    from pipeline.diffusion.generate import generate_class

    params = _params(images, steps, 16, resolution)
    start, cpu = time.perf_counter(), time.process_time()
    generate_class(params, ws.BENCH_CLASS)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"images": images, "wall_s": wall, "cpu_s": cpu, "s_per_image": wall / images, "cpu_s_per_image": cpu / images}


def scaling_child(workdir: str, rows: list[dict], steps: int, gen_steps: int, resolutions: list[int],
                  finetune_images: list[int], generated: list[int]) -> dict:
    """Every point in one process (imports once); each point runs in its own workspace folder."""
    from pipeline.diffusion.tiny import build_tiny_pipeline

    points = {"resolution": [], "finetune_images": [], "generated": []}
    top = max(resolutions)
    for res in resolutions:
        base = Path(workdir) / f"scaling-base-{res}"
        if not (base / "model_index.json").is_file():
            build_tiny_pipeline(res, seed=0).save_pretrained(base, safe_serialization=True)
        root = ws.diffusion_workspace(Path(workdir) / f"ws-scaling-{res}", base, rows)
        enter_workspace(root)
        ft = _finetune_point(root, rows, res, steps)
        gen = _generate_point(res, 16 if 16 in generated else generated[0], gen_steps)
        points["resolution"].append({"resolution": res, "finetune": ft, "generate": gen})
        if res == top:
            for n in finetune_images:
                if n == len(rows):
                    points["finetune_images"].append({"images": n, **ft})
                else:
                    points["finetune_images"].append({"images": n, **_finetune_point(root, rows[:n], res, steps)})
            for n in generated:
                points["generated"].append(gen if n == gen["images"] else _generate_point(res, n, gen_steps))
    points["finetune_images"].sort(key=lambda p: p["images"])
    return points


def _fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x; returns (a, b)."""
    import numpy as np

    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a), float(b)


def _plot(points: dict, fits: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.core.atomic import atomic_file

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    res = [p["resolution"] for p in points["resolution"]]
    ax = axes[0]
    ax.plot(res, [p["finetune"]["cpu_s_per_step"] for p in points["resolution"]], "o-", label="fine-tune: CPU s / step")
    ax.plot(res, [p["generate"]["cpu_s_per_image"] for p in points["resolution"]], "s-", label="generate: CPU s / image")
    ax.set_xlabel("resolution (px)")
    ax.set_ylabel("CPU seconds")
    ax.set_xticks(res)
    ax.set_title("cost vs resolution")
    ax.legend(fontsize=8)
    ax = axes[1]
    n = [p["images"] for p in points["finetune_images"]]
    ax.plot(n, [p["setup_s"] for p in points["finetune_images"]], "o-", label="load + encode + 1st step (wall s)")
    ax.plot(n, [p["end_to_end_s"] for p in points["finetune_images"]], "s-", label="whole fine-tune run (wall s)")
    ax.set_xlabel("fine-tune images")
    ax.set_ylabel("seconds")
    ax.set_xticks(n)
    ax.set_title("cost vs fine-tune images")
    ax.legend(fontsize=8)
    ax = axes[2]
    g = [p["images"] for p in points["generated"]]
    ax.plot(g, [p["cpu_s"] for p in points["generated"]], "o-", label="generate (CPU s)")
    a, b = fits["generate_cpu_s_vs_images"]
    ax.plot(g, [a + b * x for x in g], "--", color="grey", label=f"fit {a:.1f} + {b:.2f} s x images")
    ax.set_xlabel("images generated")
    ax.set_ylabel("CPU seconds")
    ax.set_xticks(g)
    ax.set_title("cost vs images generated")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(report_paths()[2]) as temp:
        fig.savefig(temp, format="png", dpi=110)
    plt.close(fig)


def run(settings: Settings) -> BenchResult:
    quick = settings.quick
    resolutions = [16, 32] if quick else list(RESOLUTIONS)
    finetune_images = [2, 4] if quick else list(FINETUNE_IMAGES)
    generated = [1, 2] if quick else list(GENERATED)
    steps, gen_steps = (3, 2) if quick else (20, 20)
    rows = ws.finetune_rows(settings, ws.BENCH_CLASS, max(finetune_images))
    res = run_arm(settings, "scaling", "bench.scaling:scaling_child",
                  {"workdir": str(settings.workdir), "rows": rows, "steps": steps, "gen_steps": gen_steps,
                   "resolutions": resolutions, "finetune_images": finetune_images, "generated": generated})
    points = res.result
    pixels = [p["resolution"] ** 2 / 1000 for p in points["resolution"]]
    fits = {
        "finetune_cpu_s_per_step_vs_kpixels": _fit(pixels, [p["finetune"]["cpu_s_per_step"] for p in points["resolution"]]),
        "generate_cpu_s_per_image_vs_kpixels": _fit(pixels, [p["generate"]["cpu_s_per_image"] for p in points["resolution"]]),
        "finetune_setup_s_vs_images": _fit([p["images"] for p in points["finetune_images"]], [p["setup_s"] for p in points["finetune_images"]]),
        "generate_cpu_s_vs_images": _fit([p["images"] for p in points["generated"]], [p["cpu_s"] for p in points["generated"]]),
    }
    _plot(points, fits)
    result = BenchResult("scaling")
    result.data = {"settings": {"finetune_steps": steps, "generate_steps": gen_steps, "batch": 4, "generate_batch": 16,
                                "lora_rank": 8, "base": "untrained tiny SD"},
                   "points": points, "fits": {k: {"intercept": a, "slope": b} for k, (a, b) in fits.items()},
                   "plot": str(report_paths()[2])}
    rrows = [[p["resolution"], p["finetune"]["s_per_step"], p["finetune"]["cpu_s_per_step"], p["generate"]["s_per_image"],
              p["generate"]["cpu_s_per_image"]] for p in points["resolution"]]
    result.tables.append(("Resolution (LoRA fine-tune at batch 4; generation of 16 images, 20 DPM-Solver++ steps)",
                          table(["px", "fine-tune s/step", "CPU s/step", "generate s/image", "CPU s/image"], rrows)))
    nrows = [[p["images"], p["setup_s"], p["after_loop_s"], p["end_to_end_s"], p["steps_per_s"]] for p in points["finetune_images"]]
    result.tables.append((f"Fine-tune images ({max(resolutions)}px, {steps} steps)",
                          table(["images", "load+encode+1st step s", "validation grid+save s", "whole run s", "steps/s"], nrows)))
    grows = [[p["images"], p["wall_s"], p["cpu_s"], p["cpu_s_per_image"]] for p in points["generated"]]
    result.tables.append((f"Images generated ({max(resolutions)}px, batch 16)", table(["images", "wall s", "CPU s", "CPU s/image"], grows)))
    f = result.data["fits"]
    fit_rows = [
        ["fine-tune CPU s/step", f"{f['finetune_cpu_s_per_step_vs_kpixels']['intercept']:.3f} + {f['finetune_cpu_s_per_step_vs_kpixels']['slope'] * 1000:.3f} ms x kpixel"],
        ["generate CPU s/image", f"{f['generate_cpu_s_per_image_vs_kpixels']['intercept']:.3f} + {f['generate_cpu_s_per_image_vs_kpixels']['slope'] * 1000:.3f} ms x kpixel"],
        ["fine-tune set-up s", f"{f['finetune_setup_s_vs_images']['intercept']:.2f} + {f['finetune_setup_s_vs_images']['slope']:.3f} s x fine-tune image"],
        ["generate CPU s", f"{f['generate_cpu_s_vs_images']['intercept']:.2f} + {f['generate_cpu_s_vs_images']['slope']:.3f} s x image"],
    ]
    result.tables.append(("Per-unit costs (least-squares fits)", table(["quantity", "fit"], fit_rows)))
    step64 = points["resolution"][-1]["finetune"]["cpu_s_per_step"]
    img64 = points["resolution"][-1]["generate"]["cpu_s_per_image"]
    result.notes += [
        f"Prediction at {max(resolutions)}px on one idle core: fine-tune ~= {step64:.3f} s x steps per class "
        f"(300 steps: {300 * step64 / 60:.1f} min); generation ~= {img64:.3f} s x images (100 per class: {100 * img64 / 60:.1f} min).",
        "The number of fine-tune images only changes the one-time latent encoding (cached), not the cost per step; "
        "each fine-tune run also pays a fixed validation grid (4 images x 20 steps) + save after its loop.",
        f"Plot: {result.data['plot']}.",
    ]
    return result
