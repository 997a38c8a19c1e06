"""A LoRA student against a full copy, on one Stable Diffusion teacher built here (random weights, nothing
downloaded): the memory a run holds (weights, gradients, Adam states: each tensor counted once), the process's
peak memory and the time per SFD iteration, each run in its own process, and each student's paired RMSE to the
teacher's own trajectory from the same noises after the same budget. Then the same held memory each way for
SD 1.5, SDXL and Flux from their parameter counts.

    python scripts/bench_lora.py --out bench/lora [--iters 100] [--rank 8]

Prints a table and writes bench/lora/lora.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# denoiser parameter counts of the models people distil (diffusers' configs)
SIZES = {"SD 1.5 UNet": 859.5e6, "SDXL UNet": 2567.5e6, "Flux.1 transformer": 11901.4e6}

RUN = r'''
import json, sys, time, torch
import fewstep
from fewstep.models import load_model
job = json.loads(sys.argv[1])
teacher = load_model(job["teacher"])
t0 = time.perf_counter()
student = fewstep.distill_sfd(teacher, job["out"], nfe=2, prompts=job["prompts"], iters=job["iters"], batch=4,
                              progress=False, ckpt_every=0, **({"lora": job["rank"]} if job["rank"] else {}))
tr = student.card["training"]
trained = sum(p.numel() for n, p in student.denoiser.net.named_parameters() if not job["rank"] or "lora_" in n)
print(json.dumps({"peak_mb": tr["peak_memory_mb"], "s_per_iter": tr["wall_time_s"] / job["iters"],
                  "trained_params": trained}))
'''


HELD = r'''
import json, sys, torch
from fewstep.models import load_model
from fewstep.sfd.config import SFDConfig
from fewstep.sfd.method import SFD
from fewstep.train import TrainConfig, Trainer
job = json.loads(sys.argv[1])
method = SFD(load_model(job["teacher"]), SFDConfig(nfe=[2], lora=job["rank"] or None), prompts=job["prompts"])
trainer = Trainer(method, TrainConfig(steps=2, batch=4, lr=5e-5, progress=False, profile=False), job["out"])
trainer.run()
# every tensor the run holds between iterations, each storage counted once: teacher and student weights,
# the student's gradients and Adam's moments
tensors = [*method.traj.den.parameters(), *method.student.parameters()]
tensors += [p.grad for p in trainer.params if p.grad is not None]
tensors += [v for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
print(json.dumps({"held_mb": sum(seen.values()) / 2**20}))
'''


def build_teacher(root: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_interop_latent import byte_level_tokenizer

    import fewstep
    torch.manual_seed(0)
    tok = byte_level_tokenizer()
    n = len(tok)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=n - 2,
                                        eos_token_id=n - 1, pad_token_id=n - 1)).eval()
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256),
                                layers_per_block=2, cross_attention_dim=64, attention_head_dim=16,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                        norm_num_groups=8, sample_size=32).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(root / "sd")
    return fewstep.import_model(root / "sd", root / "sd-f").path


def paired_rmse(student_path: Path, teacher_path: Path, prompts: list, n: int = 64) -> float:
    """RMS distance (latents) between the student's samples and the teacher trajectory's last states that SFD
    trains it on (DPM-Solver++(3M) over the refined grid), from the same noises and prompts."""
    import torch

    from fewstep.models import load_model
    from fewstep.sampling import sample
    from fewstep.solvers import solve
    student, teacher = load_model(student_path), load_model(teacher_path)
    spec = student.card["sampler"]
    noise = torch.randn((n, 4, 16, 16), generator=torch.Generator().manual_seed(123))
    x = sample(student, n, noise=noise, prompts=prompts, decode=False, progress=False)
    text = teacher.denoiser.encode_prompts(prompts, "", student.card["text"]["distilled_guidance"])
    labels = torch.arange(n) % len(prompts)
    from fewstep.sfd.config import SFDConfig
    from fewstep.sfd.trajectory import sfd_grids
    _, t_grid = sfd_grids(teacher.denoiser, SFDConfig(nfe=[spec["nfe"]]), spec["nfe"])
    with torch.no_grad():
        y = solve("dpmpp3m", teacher.denoiser.with_step(None, labels, text), noise * float(t_grid[0]), t_grid,
                  lower_order_final="always").x
    return float((x - y).square().mean().sqrt())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    teacher = root / "sd-f" if (root / "sd-f" / "fewstep.json").is_file() else build_teacher(root)
    from fewstep.components import default_prompts
    prompts = default_prompts()[:16]
    rows = {}
    for name, rank in (("full copy", 0), (f"LoRA rank {args.rank}", args.rank)):
        out = root / ("full" if not rank else f"lora{rank}")
        job = {"teacher": str(teacher), "out": str(out), "iters": args.iters, "rank": rank, "prompts": prompts}
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", RUN, json.dumps(job)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        rows[name] = {**json.loads(r.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0,
                      "paired_rmse": paired_rmse(out, teacher, prompts)}
        job = {**job, "out": str(out) + "-held"}
        r = subprocess.run([sys.executable, "-c", HELD, json.dumps(job)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        rows[name].update(json.loads(r.stdout.strip().splitlines()[-1]))
    from fewstep.models import load_model
    params = sum(p.numel() for p in load_model(teacher).denoiser.net.parameters())
    lora_share = rows[f"LoRA rank {args.rank}"]["trained_params"] / params
    # fp32 bytes a parameter: full SFD keeps teacher and student weights, the student's gradient and Adam's two
    # moments (4 + 4 + 4 + 8); a LoRA student keeps one set of weights and those four for the adapter alone
    projection = {name: {"full_gb": 20 * p / 2**30, "lora_gb": (4 + 16 * lora_share) * p / 2**30}
                  for name, p in SIZES.items()}
    result = {"teacher_params": params, "iters": args.iters, "batch": 4, "rows": rows, "lora_share": lora_share,
              "projection_fp32_weights_and_optimizer": projection}
    (root / "lora.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"teacher UNet {params / 1e6:.1f}M parameters; SFD NFE 2, {args.iters} iterations of 4, 2 CPU threads")
    print(f"{'student':<14} {'trained':>10} {'held MB':>8} {'peak MB':>8} {'s/iter':>7} {'paired RMSE':>12}")
    for name, r in rows.items():
        print(f"{name:<14} {r['trained_params'] / 1e6:>9.2f}M {r['held_mb']:>8.0f} {r['peak_mb']:>8.0f} "
              f"{r['s_per_iter']:>7.3f} {r['paired_rmse']:>12.4f}")
    print("held: weights, gradients and Adam states the run keeps between iterations (each storage once); peak: "
          "the process's peak resident memory, activations and libraries included")
    print("weights + gradients + Adam in fp32 (no activations), the same adapter share "
          f"({100 * lora_share:.2f} % of the network):")
    for name, p in projection.items():
        print(f"  {name:<20} full copy {p['full_gb']:6.1f} GB   LoRA {p['lora_gb']:6.1f} GB")


if __name__ == "__main__":
    main()
