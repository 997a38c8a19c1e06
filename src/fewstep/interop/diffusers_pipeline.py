"""FewstepPipeline: the sampler of a model exported by `fewstep export --format diffusers`.

This file is copied into every export as `pipeline.py` and needs only torch and diffusers (fewstep
itself is not needed). The `sampler` entry of the export's `model_index.json` holds everything it
uses: the σ grid, solver (euler / ddim / ddpm / dpmpp2m / dpmpp3m), AFS, clip, parameterization (a flow
model's velocity included) and time input (an SFD-v step condition is folded into the network's biases). It works in σ-space,
x = x0 + σ·ε, and repeats fewstep's arithmetic operation for operation (float64 noise levels, float32
states), so for the same initial noise it returns what `fewstep sample` returns.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=f"{folder}/pipeline.py",
                                             trust_remote_code=True)
    # or, without diffusers' loader:  from pipeline import load_pipeline; pipe = load_pipeline(folder)
    images = pipe(batch_size=16, seed=0).images
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput


TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


class FewstepPipeline(DiffusionPipeline):
    # a latent model's autoencoder, a text-to-image model's text encoders and tokenizers (SD3 has three of
    # each); absent otherwise
    _optional_components = ["vae", *TEXT_PARTS]

    def __init__(self, unet, sampler: dict | None = None, vae=None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                              tokenizer_3=tokenizer_3)
        self.register_to_config(sampler=sampler)
        self._context = self._negative = self._pooled = self._negative_pooled = None
        self._guidance = 1.0

    # ---- text and latents (as fewstep.components and fewstep.denoiser do them) ----------------------------
    def _hidden(self, tok, enc, prompts: list, max_length: int, penultimate: bool = False):
        """(hidden states, pooled projection or None) of each prompt padded to `max_length` tokens, in batches
        of the export's size: the last hidden state, or the one before it."""
        hidden, pooled = [], []
        step = self.spec["text"]["batch"]
        for i in range(0, len(prompts), step):
            ids = tok(list(prompts[i:i + step]), padding="max_length", max_length=max_length,
                      truncation=True, return_tensors="pt")
            mask = ids.attention_mask.to(self.device) if getattr(enc.config, "use_attention_mask", False) else None
            out = enc(ids.input_ids.to(self.device), attention_mask=mask, output_hidden_states=penultimate)
            hidden.append((out.hidden_states[-2] if penultimate else out[0]).float())
            vector = getattr(out, "text_embeds", None)  # CLIP's projection, else CLIP's pooled output (Flux)
            vector = getattr(out, "pooler_output", None) if vector is None else vector
            if vector is not None:
                pooled.append(vector.float())
        return torch.cat(hidden), torch.cat(pooled) if pooled else None

    def encode_prompts(self, prompts: list):
        """Stable Diffusion: the text encoder's last hidden state of each prompt, padded to the tokenizer's max
        length. SD3: (CLIP-L's and CLIP-G's penultimate hidden states side by side, zero-padded to the joint
        width, then T5's last hidden state, or zeros without T5; the two CLIPs' pooled projections)."""
        settings = self.spec["text"].get("encoders")
        if settings is None:
            return self._hidden(self.tokenizer, self.text_encoder, prompts, self.tokenizer.model_max_length)[0]
        length = self.tokenizer.model_max_length
        if settings["kind"] == "sdxl":  # both CLIPs' penultimate states side by side, the second's projection
            h1 = self._hidden(self.tokenizer, self.text_encoder, prompts, length, penultimate=True)[0]
            h2, pooled = self._hidden(self.tokenizer_2, self.text_encoder_2, prompts, self.tokenizer_2.model_max_length,
                                      penultimate=True)
            return torch.cat([h1, h2], -1), pooled
        if settings["kind"] == "flux":  # T5's tokens, CLIP's pooled output
            pooled = self._hidden(self.tokenizer, self.text_encoder, prompts, length)[1]
            return self._hidden(self.tokenizer_2, self.text_encoder_2, prompts, settings["max_sequence_length"])[0], pooled
        h1, p1 = self._hidden(self.tokenizer, self.text_encoder, prompts, length, penultimate=True)
        h2, p2 = self._hidden(self.tokenizer_2, self.text_encoder_2, prompts, length, penultimate=True)
        clip = torch.cat([h1, h2], -1)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), settings["max_sequence_length"], settings["joint_dim"], device=clip.device)
        else:
            t5 = self._hidden(self.tokenizer_3, self.text_encoder_3, prompts, settings["max_sequence_length"])[0]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], -2), torch.cat([p1, p2], -1)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        lat = self.spec.get("latent")
        if lat is None:
            return z
        out, step = [], lat["batch"]
        for i in range(0, len(z), step):
            part = z[i:i + step].to(self.device, self.vae.dtype) / lat["scaling_factor"] + lat.get("shift_factor", 0.0)
            out.append(self.vae.decode(part).sample.float().to(z.device))
        return torch.cat(out)

    # ---- the denoiser D(x, σ) -> x0 ---------------------------------------------------------------
    @property
    def spec(self) -> dict:
        s = self.config.sampler
        if not s or s.get("format") != "fewstep-diffusers-export":
            raise ValueError("FewstepPipeline: model_index.json has no fewstep 'sampler' entry")
        return s

    def time_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's time input for each σ (float64 in, float32 out)."""
        ti = self.spec["time_input"]
        if ti["kind"] == "continuous" and ti["time_code"] == "flow":  # in float64, rounded once
            s = sigma.double()
            return (ti["time_params"]["T"] * (s / (1 + s))).float()
        if ti["kind"] == "continuous":  # in float32, as NVlabs/edm computes its c_noise
            code, p, s = ti["time_code"], ti["time_params"], sigma.float()
            if code == "edm":
                return s.log() / 4
            if code == "vp":
                t = ((p["beta_min"] ** 2 + 2 * p["beta_d"] * (1 + s**2).log()).sqrt() - p["beta_min"]) / p["beta_d"]
                return (p["M"] - 1) * t
            if code == "ve":
                return (s / 2).log()
            raise ValueError(f"unknown time code {code!r}")
        s = sigma.double().cpu()
        ab = torch.tensor(ti["alpha_bar"], dtype=torch.float64)
        ts = torch.tensor(ti["timesteps"], dtype=torch.float64) if "timesteps" in ti else \
            torch.arange(len(ab), dtype=torch.float64)  # the table index itself
        table = ((1 - ab) / ab).sqrt()
        if ti["exact"]:
            idx = (s[:, None].log() - table[None].log()).abs().argmin(1)
            if ((table[idx] - s).abs() > 1e-4 * s).any():
                raise ValueError("this model can only be evaluated on its own noise levels (its step table)")
            return ts[idx].float().to(sigma.device)
        log_table = table.log()
        log_s = s.clamp(min=1e-30).log().clamp(log_table[0], log_table[-1])
        hi = torch.searchsorted(log_table, log_s).clamp(1, len(log_table) - 1)
        lo = hi - 1
        idx = lo.to(torch.float64) + (log_s - log_table[lo]) / (log_table[hi] - log_table[lo])
        lo = idx.floor().long().clamp(0, len(ts) - 1)
        hi = (lo + 1).clamp(max=len(ts) - 1)
        w = idx - lo
        return (ts[lo] * (1 - w) + ts[hi] * w).float().to(sigma.device)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, t=None) -> torch.Tensor:
        """x0 estimate at noise level σ; `t` is the network's time input when known (the export stores
        the one fewstep computes for each grid point), else it follows the time-input rule."""
        spec = self.spec
        param, sd = spec["param"], spec["sigma_data"]
        sigma = sigma.to(device=x.device, dtype=torch.float64).reshape(-1).expand(x.shape[0])

        def b(v):
            return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

        if param == "ve":
            c_in = torch.ones_like(sigma)
        elif param == "flow":
            c_in = 1 / (1 + sigma)
        else:
            c_in = 1 / (sigma**2 + (sd**2 if param == "edm" else 1.0)).sqrt()
        # the network runs in the dtype it was loaded in (torch_dtype=...); the solver's arithmetic in float32
        x_in = (x * b(c_in)).to(self.unet.dtype)
        t = self.time_input(sigma) if t is None else torch.full((x.shape[0],), float(t), device=x.device)
        if spec["network"]["type"] in ("diffusers-unet2d-cond", "diffusers-unet2d-xl"):
            context = self._context[class_labels].to(x.device, self.unet.dtype)
            added = {}
            if "time_ids" in spec["network"]:  # SDXL: the pooled embedding and the size ids beside the tokens
                ids = torch.tensor(spec["network"]["time_ids"], device=x.device, dtype=self.unet.dtype)
                added = {"text_embeds": self._pooled[class_labels].to(x.device, self.unet.dtype),
                         "time_ids": ids.expand(x.shape[0], -1)}
            if self._guidance == 1.0:
                raw = self.unet(x_in, t, encoder_hidden_states=context,
                                **({"added_cond_kwargs": added} if added else {})).sample
            else:  # classifier-free guidance, both halves in one call
                negative = self._negative.to(x.device, self.unet.dtype).expand(x.shape[0], -1, -1)
                if added:
                    neg_pooled = self._negative_pooled.to(x.device, self.unet.dtype).expand(x.shape[0], -1)
                    added = {"text_embeds": torch.cat([neg_pooled, added["text_embeds"]]),
                             "time_ids": torch.cat([added["time_ids"]] * 2)}
                both = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([negative, context]),
                                 **({"added_cond_kwargs": added} if added else {})).sample.to(x.dtype)
                uncond, cond = both.chunk(2)
                raw = uncond + self._guidance * (cond - uncond)
        elif spec["network"]["type"] == "diffusers-sd3-transformer":
            context = self._context[class_labels].to(x.device, self.unet.dtype)
            pooled = self._pooled[class_labels].to(x.device, self.unet.dtype)
            if self._guidance == 1.0:
                raw = self.unet(hidden_states=x_in, timestep=t, encoder_hidden_states=context,
                                pooled_projections=pooled, return_dict=False)[0]
            else:
                negative = self._negative.to(x.device, self.unet.dtype).expand(x.shape[0], -1, -1)
                neg_pooled = self._negative_pooled.to(x.device, self.unet.dtype).expand(x.shape[0], -1)
                both = self.unet(hidden_states=torch.cat([x_in, x_in]), timestep=torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([negative, context]),
                                 pooled_projections=torch.cat([neg_pooled, pooled]), return_dict=False)[0].to(x.dtype)
                uncond, cond = both.chunk(2)
                raw = uncond + self._guidance * (cond - uncond)
        elif spec["network"]["type"] == "diffusers-flux-transformer":
            raw = self._flux(x_in, t, self._context[class_labels], self._pooled[class_labels])
        elif spec["network"]["type"] == "diffusers-unet2d":
            raw = self.unet(x_in, t, class_labels=class_labels).sample
        else:
            raw = self.unet(x_in, t, class_labels=class_labels)
        raw = raw.to(x.dtype)
        s = b(sigma)
        if param == "eps":
            out = x - s * raw
        elif param == "x0":
            out = raw
        elif param == "ve":
            out = x + s * raw
        elif param == "v":
            a = 1 / (1 + s**2).sqrt()
            out = a * (a * x) - s * a * raw
        elif param == "edm":
            out = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * raw
        elif param == "flow":  # x_t = x/(1 + σ), x0 = x_t − t·v, t = σ/(1 + σ), coefficients from float64
            out = b(1 / (1 + sigma)) * x - b(sigma / (1 + sigma)) * raw
        else:
            raise ValueError(f"unknown parameterization {param!r}")
        clip = spec["clip"]
        self._unclipped = out  # DDIM's direction is the network's own estimate
        return out.clamp(-clip, clip) if clip is not None else out

    def _flux(self, x, t, context, pooled):
        """FluxTransformer2DModel on (N, C, H, W) latents: packed into 2×2 patches with their row and column as
        position ids, the timestep as t, a guidance-distilled model's scale as its input (FluxPipeline's way)."""
        n, ch, h, w = x.shape
        dt = self.unet.dtype
        packed = x.view(n, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, ch * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        guidance = None
        if self.unet.config.guidance_embeds:
            guidance = torch.full((n,), self._guidance, device=x.device, dtype=torch.float32)
        out = self.unet(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                        pooled_projections=pooled.to(x.device, dt), encoder_hidden_states=context.to(x.device, dt),
                        txt_ids=torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype),
                        img_ids=img_ids.reshape(-1, 3).to(x.dtype), return_dict=False)[0]
        c = out.shape[-1] // 4
        return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    # ---- the solvers ------------------------------------------------------------------------------
    def _solve(self, x, labels, generator):
        spec = self.spec
        sigmas = torch.tensor(spec["sigmas"], dtype=torch.float64, device=x.device)
        solver = spec["solver"]
        times = spec.get("time_inputs") or [None] * len(sigmas)
        hist = []  # DPM-Solver++'s earlier (x0, λ), newest first
        afs = solver == "euler" and spec["afs"]
        # the bar counts network evaluations (the NFE), not steps: SFD's analytical first step calls none
        bar = self.progress_bar(total=len(sigmas) - 1 - int(afs))
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            if solver == "euler":
                if afs and i == 0:
                    d = x / math.sqrt(1 + float(s) ** 2)  # SFD's analytical first step: no network call
                else:
                    d = (x - self.denoise(x, s, labels, times[i])) / s.to(x.dtype)
                x = x + (s_next - s).to(x.dtype) * d
            elif solver in ("ddim", "ddpm"):
                eta = 0.0 if solver == "ddim" else 1.0
                x0 = self.denoise(x, s, labels, times[i])
                # with a clip, DDIM keeps the network's own ε; DDPM's posterior mean uses the clipped estimate
                x0_dir = self._unclipped if solver == "ddim" else x0
                s_up = (eta**2 * s_next**2 * (s**2 - s_next**2) / s**2).clamp(min=0).sqrt()
                s_down = (s_next**2 - s_up**2).clamp(min=0).sqrt()
                x = x0 + (s_down / s).to(x.dtype) * (x - x0_dir)
                if eta > 0 and s_next > 0:
                    x = x + s_up.to(x.dtype) * torch.randn(x.shape, generator=generator, device=x.device,
                                                          dtype=x.dtype)
            elif solver in ("dpmpp2m", "dpmpp3m"):
                x = self._dpmpp_step(x, i, sigmas, labels, hist, 2 if solver == "dpmpp2m" else 3, times[i])
            else:
                raise ValueError(f"unknown solver {solver!r}")
            if not (afs and i == 0):
                bar.update()
        bar.close()
        return x

    def _dpmpp_step(self, x, i, sigmas, labels, hist, order, t):
        """One step of DPM-Solver++ multistep (data prediction) in λ = −log σ; order warms up from 1
        and, with fewer than 15 steps, drops again at the last steps; a step to σ = 0 is a denoise."""
        n = len(sigmas) - 1
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = self.denoise(x, s, labels, t)
        lam = -s.log()
        step_order = min(order, i + 1)
        if self.spec.get("lower_order_final", True) and n < 15:
            step_order = min(step_order, n - i)
        if s_next == 0:
            x_new = x0
        else:
            h = -s_next.log() - lam
            phi1 = -torch.expm1(-h)
            x_new = (s_next / s).to(x.dtype) * x + phi1.to(x.dtype) * x0
            if step_order >= 2:
                x0_1, lam_1 = hist[0]
                r0 = (lam - lam_1) / h
                d1_0 = (x0 - x0_1) / r0.to(x.dtype)
                if step_order == 2:
                    x_new = x_new + (phi1 / 2).to(x.dtype) * d1_0
                else:
                    x0_2, lam_2 = hist[1]
                    r1 = (lam_1 - lam_2) / h
                    d1_1 = (x0_1 - x0_2) / r1.to(x.dtype)
                    d1 = d1_0 + (r0 / (r0 + r1)).to(x.dtype) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1).to(x.dtype)
                    phi2 = phi1 / h - 1
                    phi3 = phi2 / h + 0.5
                    x_new = x_new - phi2.to(x.dtype) * d1 + phi3.to(x.dtype) * d2
        hist.insert(0, (x0, lam))
        del hist[2:]
        return x_new

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, seed: int | None = None, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, class_labels=None, output_type: str = "pil",
                 return_dict: bool = True, chunk_size: int = 500, prompt=None, negative_prompt: str | None = None,
                 guidance_scale: float | None = None):
        """Sample `batch_size` images (or `len(noise)`).

        prompt (text-to-image models): one prompt or a list, sample i taking prompt i mod their number;
        guidance_scale and negative_prompt default to the model's (a distilled student: 1, the prompt alone).

        noise: unit Gaussian initial noise of shape (N, *sample_shape); else drawn from `seed` as
        `fewstep sample --seed` draws it, else from `generator`. DDPM's per-step noise comes from
        `seed` + 1 (as in fewstep) or `generator`. output_type: "raw" (the sample in the data range,
        exactly fewstep's), "pt" (images in [0, 1], NCHW), "np" (NHWC in [0, 1]) or "pil"."""
        spec = self.spec
        shape = tuple(spec["sample_shape"])
        device = self.device
        if noise is None:
            gen = torch.Generator().manual_seed(seed) if seed is not None else generator
            noise = torch.randn((batch_size, *shape), generator=gen)
        noise = torch.as_tensor(noise, dtype=torch.float32)
        if tuple(noise.shape[1:]) != shape:
            raise ValueError(f"noise: expected shape (N, {', '.join(map(str, shape))}), got {tuple(noise.shape)}")
        n = len(noise)
        labels = None
        k = spec["num_classes"]
        if "text" in spec:
            if prompt is None:
                raise ValueError("this model is text-conditioned: pass prompt=...")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            text = spec["text"]
            emb = self.encode_prompts(prompts + [text["negative_prompt"] if negative_prompt is None else negative_prompt])
            emb, pooled = emb if isinstance(emb, tuple) else (emb, None)
            if (negative_prompt is None and text["negative_prompt"] == ""
                    and (text.get("encoders") or {}).get("zeros_for_empty_prompt")):
                emb[-1:], pooled[-1:] = 0.0, 0.0  # SDXL: no negative prompt is zero embeddings
            self._context, self._negative = emb[:-1], emb[-1:]
            if pooled is not None:
                self._pooled, self._negative_pooled = pooled[:-1], pooled[-1:]
            self._guidance = float(text["guidance"] if guidance_scale is None else guidance_scale)
            labels = torch.arange(n) % len(prompts)
        elif prompt is not None:
            raise ValueError("prompt was given, but this model is not text-conditioned")
        elif k:
            if class_labels is None:
                gen = torch.Generator().manual_seed(seed + 2) if seed is not None else generator
                labels = torch.randint(k, (n,), generator=gen)
            else:
                labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
                labels = labels.expand(n) if labels.numel() == 1 else labels
            if len(labels) != n or labels.min() < 0 or labels.max() >= k:
                raise ValueError(f"class_labels: expected {n} labels in 0..{k - 1}")
        elif class_labels is not None:
            raise ValueError("class_labels were given, but this model is not class-conditional")
        step_gen = generator
        if seed is not None:
            step_gen = torch.Generator(device=device).manual_seed(seed + 1)
        sigma_max = float(spec["sigmas"][0])
        # the first and last states: σ·ε in fewstep's convention, or at the VP scale of diffusers' pipelines, or
        # at a flow's, x = (1 + σ)·x_t
        kind, last = spec.get("scale"), float(spec["sigmas"][-1])
        scale = {"vp": math.sqrt(1 + sigma_max**2), "flow": 1 + sigma_max}.get(kind, sigma_max)
        end = {"vp": math.sqrt(1 + last**2), "flow": 1 + last}.get(kind, 1.0)
        out = []
        for i in range(0, n, chunk_size):
            x = noise[i:i + chunk_size].to(device) * scale
            lab = None if labels is None else labels[i:i + chunk_size].to(device)
            out.append(self.decode_latents(self._solve(x, lab, step_gen) / end).float().cpu())
        x = torch.cat(out)
        if output_type == "raw":
            images = x
        elif not spec["image"]:
            if output_type != "np":
                raise ValueError(f"output_type {output_type!r}: this model draws {list(shape)}-vectors, not images; "
                                 "use 'raw' or 'np'")
            images = x.numpy()
        else:
            img = (x / 2 + 0.5).clamp(0, 1)
            if output_type == "pt":
                images = img
            else:
                images = img.permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
                elif output_type != "np":
                    raise ValueError(f"output_type {output_type!r}: expected raw, pt, np or pil")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def load_pipeline(folder) -> FewstepPipeline:
    """The pipeline of an export folder, without diffusers' dynamic-module loader."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    for name in ("vae", *TEXT_PARTS):
        if name in index:
            library, cls = index[name]
            lib = importlib.import_module(library)
            parts[name] = getattr(lib, cls).from_pretrained(str(folder / name))
            if hasattr(parts[name], "eval"):
                parts[name].eval()
    library, name = index["unet"]
    if library == "diffusers":
        import diffusers
        unet = getattr(diffusers, name).from_pretrained(str(folder / "unet"))
    else:
        path = folder / "unet" / f"{library}.py"
        mod_name = f"exported_net_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        import sys
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        unet = getattr(module, name).from_pretrained(str(folder / "unet"))
    return FewstepPipeline(unet=unet.eval(), sampler=index["sampler"], **parts)


__all__ = ["FewstepPipeline", "load_pipeline"]
