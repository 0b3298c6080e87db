"""Fine-tuning step throughput: the project's loop vs diffusers' example scripts with their fastest options.

ours       ``pipeline.diffusion.finetune.finetune_class`` itself, as the stage calls it: cached posterior
           mean/std (a fresh latent drawn each step) and prompt embedding, channels_last UNet, fused AdamW.
reference  diffusers' train_dreambooth.py / train_text_to_image_lora_sdxl.py with their caching options:
           the prompt embedding computed once (``--pre_compute_text_embeddings``) and every image encoded
           once before training (the SDXL scripts' ``compute_vae_encodings``: resize, crop, random flip,
           ``vae.encode(...).latent_dist.sample()``), then a shuffling DataLoader over the cached latents; same
           base model, same ``lora.add_lora`` adapter (or full UNet for DreamBooth), AdamW (default
           implementation) with the same lr, batch and grad clipping.
Both arms therefore run only the UNet step in their loop: the ratio is what the project adds or costs over the
strongest configuration a user would otherwise run. Step times come from torch's global optimizer-step hook in
both arms; steps/s is over the steady state (after ``WARMUP`` steps).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import workspace as ws
from bench.common import (
    BenchResult,
    Settings,
    enter_workspace,
    median,
    optimizer_clock,
    primary_ratio,
    ratio,
    run_arm,
    table,
    target,
    workspace_env,
)

WARMUP = 3
PARITY = 0.95  # ours/reference steps/s: no slower than diffusers' cached configuration, within ~5% run-to-run noise
DEFAULT_CLASSES = ["akiec", "bcc", "df", "mel", "vasc"]


def _params(method: str, steps: int, resolution: int, batch: int, class_code: str):
    from pipeline.core.params import parse_params

    classes = DEFAULT_CLASSES if class_code in DEFAULT_CLASSES else [*DEFAULT_CLASSES[:-1], class_code]
    return parse_params({"data": {"classes": classes}, "diffusion": {
        "method": method, "steps": steps, "resolution": resolution, "batch": batch, "resume": False}})


def instrumented_finetune(params, class_code: str, with_mlflow: bool, warmup: int = WARMUP) -> dict:
    """Run the project's ``finetune_class`` (optionally inside an MLflow stage run, as ``dvc repro`` does).

    Per-step timestamps come from torch's global optimizer-step hook (see ``optimizer_clock``).
    """
    from pipeline.core import tracking
    from pipeline.diffusion.finetune import finetune_class

    start = time.perf_counter()
    with optimizer_clock() as clock:
        if with_mlflow:
            with tracking.stage_run(f"finetune@{class_code}", params, tags={"item": class_code}):
                ready = time.perf_counter()
                finetune_class(params, class_code)
        else:
            ready = start
            finetune_class(params, class_code)
    end = time.perf_counter()
    return {
        "steps": len(clock.marks), "steps_per_s": clock.rate(warmup), "steps_per_cpu_s": clock.rate(warmup, cpu=True),
        "mlflow_setup_s": ready - start,
        "setup_s": (clock.marks[0] - ready) if clock.marks else None,  # load, encode, attach, first step
        "after_loop_s": (end - clock.marks[-1]) if clock.marks else None,  # validation grid + save
        "end_to_end_s": end - ready,
    }


def ours_child(workspace: str, method: str, steps: int, resolution: int, batch: int, class_code: str,
               with_mlflow: bool = False) -> dict:
    enter_workspace(workspace)
    params = _params(method, steps, resolution, batch, class_code)
    return instrumented_finetune(params, class_code, with_mlflow)


# ----------------------------------------------------------------------------------------- reference


def reference_child(workspace: str, method: str, steps: int, resolution: int, batch: int, class_code: str) -> dict:
    """diffusers' example loop with its caching options: prompt embedding and image latents computed once."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from PIL import Image
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision import transforms

    from pipeline.diffusion import lora
    from pipeline.diffusion.base import load_base_pipeline
    from pipeline.diffusion.finetune import MAX_GRAD_NORM, WEIGHT_DECAY
    from pipeline.core.digest import derive_seed
    from pipeline.diffusion.pretrain import diffusion_target
    from pipeline.diffusion.training_data import read_finetune_csv

    enter_workspace(workspace)
    params = _params(method, steps, resolution, batch, class_code)
    d = params.diffusion
    start = time.perf_counter()
    accelerator = Accelerator(mixed_precision="no")
    pipe = load_base_pipeline(Path(workspace) / "models" / "base")
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    torch.manual_seed(derive_seed(params.seed, "finetune", class_code))
    if method == "lora":
        trainable = lora.add_lora(unet, d.lora)
    else:
        unet.requires_grad_(True)
        trainable = list(unet.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=d.learning_rate, weight_decay=WEIGHT_DECAY)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    prompt = params.class_prompt(class_code)
    paths = read_finetune_csv(Path(workspace) / "data" / "prepared" / "finetune" / f"{class_code}.csv", class_code)
    augment = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])

    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    cache_start = time.perf_counter()
    with torch.no_grad():
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(accelerator.device)
        prompt_embeds = text_encoder(ids, return_dict=False)[0]
        latents_cache = []
        for path in paths:
            with Image.open(path) as img:
                pixels = augment(img.convert("RGB"))[None].to(accelerator.device)
            latents_cache.append(vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor)
    cache_s = time.perf_counter() - cache_start

    loader = DataLoader(TensorDataset(torch.cat(latents_cache)), batch_size=batch, shuffle=True, num_workers=0)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    unet.train()

    phase = {"data": 0.0, "unet": 0.0}
    timer = optimizer_clock()
    clock = timer.__enter__()
    step = 0
    t_prev = time.process_time()
    while step < steps:
        for (latents,) in loader:
            t_data = time.process_time()
            encoder_hidden_states = prompt_embeds.expand(len(latents), -1, -1)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target_ = diffusion_target(noise_scheduler, latents, noise, timesteps)
            pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target_.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            accelerator.gather(loss.detach().repeat(batch)).mean().item()  # the scripts' train_loss bookkeeping
            t_end = time.process_time()
            if step >= WARMUP:
                phase["data"] += t_data - t_prev
                phase["unet"] += t_end - t_data
            t_prev = t_end
            step += 1
            if step >= steps:
                break
    loop_end = time.perf_counter()
    timer.__exit__(None, None, None)
    out = Path(workspace) / "reference-out"
    out.mkdir(exist_ok=True)
    if method == "lora":
        lora.save_lora(accelerator.unwrap_model(unet), out)
    end = time.perf_counter()
    total = sum(phase.values()) or float("nan")
    return {
        "steps": step, "steps_per_s": clock.rate(WARMUP), "steps_per_cpu_s": clock.rate(WARMUP, cpu=True), "end_to_end_s": end - start,
        "setup_s": clock.marks[0] - start, "after_loop_s": end - loop_end, "cache_s": cache_s,
        "share_data": phase["data"] / total, "share_unet_step": phase["unet"] / total,
        "ms_per_step_data": 1000 * phase["data"] / max(1, step - WARMUP),
        "ms_per_step_unet": 1000 * phase["unet"] / max(1, step - WARMUP),
    }


# ------------------------------------------------------------------------------------------ profiling


def profile_step(unet, latent_size: int, batch: int, steps: int = 4) -> list[dict]:
    """torch.profiler of the cached-latent LoRA step (what ours runs each step): top ops by self CPU time."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    latents = torch.randn(batch, 4, latent_size, latent_size)
    states = torch.randn(1, 77, unet.config.cross_attention_dim).expand(batch, -1, -1)
    unet.train()

    def step():
        pred = unet(latents, torch.randint(0, 1000, (batch,)), states).sample
        F.mse_loss(pred, latents).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "ms_per_step": e.self_cpu_time_total / 1000 / steps}
            for e in top]



def flops_child(resolution: int, batch: int, method: str) -> dict:
    """FLOPs of one step's parts (torch.utils.flop_counter) for the tiny base and, on the meta device, for SD 1.5."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.diffusion.lora import add_lora
    from pipeline.diffusion.tiny import build_tiny_pipeline
    from pipeline.core.params import LoraParams

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    def measure(vae, unet, text_encoder, res: int, down: int, dim: int, device: str) -> dict:
        x = torch.randn(batch, 3, res, res, device=device)
        lat = torch.randn(batch, 4, res // down, res // down, device=device)
        states = torch.randn(batch, 77, dim, device=device)
        ids = torch.zeros(batch, 77, dtype=torch.long, device=device)
        with torch.no_grad():
            enc = count(lambda: vae.encode(x).latent_dist.sample())
            text = count(lambda: text_encoder(ids)[0])

        def step():
            out = unet(lat, torch.zeros(batch, dtype=torch.long, device=device), states).sample
            out.float().pow(2).mean().backward()

        return {"vae_encode_gflops": enc, "text_encode_gflops": text, "unet_fwd_bwd_gflops": count(step),
                "caching_bound_x": (enc + text + count(step)) / count(step)}

    pipe = build_tiny_pipeline(resolution)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if method == "lora":
        add_lora(pipe.unet, LoraParams())
    result = {"tiny": measure(pipe.vae, pipe.unet, pipe.text_encoder, resolution, 4, 64, "cpu"),
              "profile": profile_step(pipe.unet, resolution // 4, batch)}
    try:  # SD 1.5's published configs, instantiated on the meta device (no weights, no memory)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
            text_encoder = CLIPTextModel(CLIPTextConfig())
        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        if method == "lora":
            add_lora(unet, LoraParams(rank=4, alpha=4))
        result["sd15_512px"] = measure(vae, unet, text_encoder, 512, 8, 768, "meta")
    except Exception as exc:  # the meta-device count is informative only
        result["sd15_512px"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return result


# ------------------------------------------------------------------------------------------------ run


def run(settings: Settings) -> BenchResult:
    quick = settings.quick
    resolution, batch = (32, 2) if quick else (64, 4)
    steps = 5 if quick else 30
    methods = ["lora", "dreambooth"]
    base = ws.tiny_base(settings, resolution)
    rows = ws.finetune_rows(settings, ws.BENCH_CLASS)
    workspace = ws.diffusion_workspace(settings.workdir / "ws-finetune", base, rows)
    arm_env = workspace_env(workspace)
    result = BenchResult("finetune")
    arms: dict[str, dict[str, list]] = {m: {"ours": [], "reference": []} for m in methods}
    for repeat in range(settings.repeats):
        for method in methods:
            kwargs = {"workspace": str(workspace), "method": method, "steps": steps, "resolution": resolution,
                      "batch": batch, "class_code": ws.BENCH_CLASS}
            # Alternate the order between repeats so drifting background load hits both arms alike.
            order = ["ours", "reference"] if repeat % 2 == 0 else ["reference", "ours"]
            for arm in order:
                target_fn = "bench.finetune:ours_child" if arm == "ours" else "bench.finetune:reference_child"
                res = run_arm(settings, f"finetune-{method}-{arm}-{repeat}", target_fn, kwargs, env=arm_env)
                arms[method][arm].append(res.as_dict())
                print(f"  finetune {method} {arm}: {res.result['steps_per_s']:.2f} steps/s, peak {res.peak_rss_mib:.0f} MiB", flush=True)
    flops = run_arm(settings, "finetune-flops", "bench.finetune:flops_child",
                    {"resolution": resolution, "batch": batch, "method": "lora"}).result

    rows_out, summary = [], {}
    for method in methods:
        ours, ref = arms[method]["ours"], arms[method]["reference"]
        o_rate, r_rate = median(a["steps_per_s"] for a in ours), median(a["steps_per_s"] for a in ref)
        o_cpu, r_cpu = median(a["steps_per_cpu_s"] for a in ours), median(a["steps_per_cpu_s"] for a in ref)
        o_mem, r_mem = max(a["peak_rss_mib"] for a in ours), max(a["peak_rss_mib"] for a in ref)
        summary[method] = {
            "ours": ours, "reference": ref,
            "ratio_steps_per_s": ratio(o_rate, r_rate),
            "ratio_steps_per_cpu_s": ratio(o_cpu, r_cpu),
            "ratio_peak_rss": ratio(o_mem, r_mem),
        }
        rows_out.append([method, "ours (cached)", median(a["end_to_end_s"] for a in ours), o_rate, o_cpu, o_mem,
                         ratio(o_rate, r_rate), ratio(o_cpu, r_cpu), ratio(o_mem, r_mem)])
        rows_out.append([method, "reference (diffusers, cached)", median(a["end_to_end_s"] for a in ref), r_rate, r_cpu, r_mem, 1.0, 1.0, 1.0])
    result.data = {"settings": {"resolution": resolution, "batch": batch, "steps": steps, "warmup_steps": WARMUP,
                                "class": ws.BENCH_CLASS, "fine_tune_images": len(rows), "repeats": settings.repeats,
                                "base": "untrained tiny SD (build_tiny_pipeline)"},
                   "methods": summary, "flops": flops}
    result.tables.append((f"Fine-tuning steps/s ({resolution}px, batch {batch}, {steps} steps, first {WARMUP} excluded)",
                          table(["method", "arm", "end-to-end s", "steps/s", "steps/CPU-s", "peak RSS MiB", "steps/s ours/ref",
                                 "CPU-based ours/ref", "RSS ours/ref"], rows_out)))
    ref_l = arms["lora"]["reference"]
    shares = [["data (cached-latent DataLoader)", median(a["ms_per_step_data"] for a in ref_l), median(a["share_data"] for a in ref_l)],
              ["UNet fwd+bwd+AdamW", median(a["ms_per_step_unet"] for a in ref_l), median(a["share_unet_step"] for a in ref_l)]]
    result.tables.append(("Where the reference LoRA step goes (CPU time)", table(["phase", "CPU ms/step", "share"], shares)))
    tiny, sd = flops["tiny"], flops.get("sd15_512px", {})
    frows = [["tiny base", f"{resolution}px b{batch}", tiny["vae_encode_gflops"], tiny["text_encode_gflops"], tiny["unet_fwd_bwd_gflops"], tiny["caching_bound_x"]]]
    if "caching_bound_x" in sd:
        frows.append(["SD 1.5 (meta device)", f"512px b{batch}", sd["vae_encode_gflops"], sd["text_encode_gflops"], sd["unet_fwd_bwd_gflops"], sd["caching_bound_x"]])
    result.tables.append(("FLOPs per LoRA step: what caching saves over encoding every step (bound = total / UNet part)",
                          table(["model", "input", "VAE enc GFLOP", "text enc GFLOP", "UNet fwd+bwd GFLOP", "bound x"], frows)))
    prows = [[p["op"][:60], p["ms_per_step"], p["share"]] for p in flops["profile"]]
    result.tables.append(("torch.profiler of ours' cached LoRA step (top ops by self CPU time)", table(["op", "ms/step", "share"], prows)))
    lora_ratio, basis = primary_ratio(settings, summary["lora"]["ratio_steps_per_s"], summary["lora"]["ratio_steps_per_cpu_s"])
    result.targets.append(target("LoRA steps/s ours/reference", lora_ratio, PARITY,
                                 note=f"{basis}; parity with diffusers' cached configuration, within run-to-run noise"))
    result.notes += [
        "Both arms cache the frozen encoders' outputs, so both loops are the UNet step: the ratio shows what ours adds "
        "(a fresh posterior draw and mirror images each step; fused AdamW and channels_last) or costs. What caching "
        "itself saves over diffusers' default (encode every step) is the FLOPs bound above: "
        f"{tiny['caching_bound_x']:.2f}x on the tiny base, "
        + (f"{sd['caching_bound_x']:.2f}x" if "caching_bound_x" in sd else "n/a") + " for SD 1.5 at 512 px.",
        f"Medians of {settings.repeats} alternating runs per arm; single runs vary by ~5-10%. ours is the library call "
        "`finetune_class` (no MLflow run); step times come from torch's global optimizer-step hook in both arms.",
        "DreamBooth has no target; reported for completeness.",
    ]
    return result
