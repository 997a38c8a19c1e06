"""The Denoiser: the one place that knows a network's own conventions.

    D(x, σ) -> x0 estimate,  with x = x0 + σ·ε  (σ-space, DESIGN.md)

It owns the parameterization (eps / x0 / v / EDM preconditioning), the input scaling and the time
input (a discrete model's table index, interpolated between entries or refused outside them when
the table is exact; or EDM's continuous noise code). Samplers and losses only ever see D.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import torch
from torch import nn

from fewstep.errors import FewstepError, on_command_line, option
from fewstep.schedule import Schedule, continuous_table

PARAMETERIZATIONS = ("eps", "x0", "v", "edm", "ve", "flow")
# what each parameterization's network predicts (for error messages and cards):
#   eps: ε, input scaled by 1/sqrt(σ²+1) (VP); x0, v: likewise; edm: EDM's F with c_skip/c_out/c_in;
#   ve: the VE-SDE's F with D = x + σ·F, input unscaled (NVlabs/edm's VEPrecond);
#   flow: a rectified flow's velocity v = ε − x0 at x_t = x/(1 + σ) = (1 − t)·x0 + t·ε, t = σ/(1 + σ)

NOT_TEXT_CONDITIONED = "a prompt was given, but this model is not text-conditioned"


def prompts_needed() -> FewstepError:
    """The refusal of a text-conditioned model run without a prompt, in the caller's spelling."""
    how = "--prompt TEXT or --prompts FILE" if on_command_line() else "prompts (a string or a list of them)"
    return FewstepError(f"this model is text-conditioned: give {how}")


class Denoiser(nn.Module):
    def __init__(self, net: nn.Module, schedule: Schedule, param: str = "eps", exact_table: bool = False):
        super().__init__()
        if param not in PARAMETERIZATIONS:
            raise FewstepError(f"parameterization {param!r}: expected one of {', '.join(PARAMETERIZATIONS)}")
        if param in ("edm", "ve") and schedule.is_discrete and schedule.derived_from != param:
            # a table read off such a model keeps its preconditioning (schedule.continuous_table)
            raise FewstepError(f"parameterization {param!r} needs a continuous schedule, got a discrete table")
        if (param == "flow") != (not schedule.is_discrete and schedule.time_code == "flow"):
            raise FewstepError("parameterization 'flow' (velocity) goes with a flow schedule (Schedule.flow), and "
                               "a flow schedule with it")
        # continuous ε-prediction is the VP-SDE's (NVlabs/edm's VPPrecond), with its own time code
        if param in ("x0", "v", "eps") and not schedule.is_discrete and not (param == "eps" and schedule.time_code == "vp"):
            raise FewstepError(f"parameterization {param!r} needs a discrete VP table; continuous models use "
                               "'edm', 've', or 'eps' with the VP-SDE's time code")
        self.net = net
        self.schedule = schedule
        self.param = param
        self.exact_table = exact_table
        # a latent model's autoencoder and a text-to-image model's text encoder (fewstep.components): frozen,
        # shared with every copy of this denoiser; None for a pixel-space, unconditional or class model
        self.codec = None
        self.text = None
        # text models: the defaults of classifier-free guidance, from the card (1: the prompt alone). A call's
        # own prompts, negative prompt and scale come with it (`Prompting`), never stored here
        self.negative_prompt = ""
        self.guidance = 1.0

    # ---- conventions ------------------------------------------------------------------------
    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    @property
    def has_step_condition(self) -> bool:
        return getattr(self.net, "step_cond", None) is not None

    def time_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's time input for each σ (float64 in, float32 out)."""
        if self.schedule.is_discrete:
            return self.schedule.time_input(sigma.double().cpu(), exact=self.exact_table).float().to(sigma.device)
        if self.param == "flow":  # T·t in float64, rounded once, as the flow scheduler's float32 timesteps are
            return self.schedule.continuous_time_input(sigma.double()).float()
        # in float32, as NVlabs/edm computes its c_noise
        return self.schedule.continuous_time_input(sigma.float())

    def _sigma_batch(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape[0] != x.shape[0]:
            raise FewstepError(f"sigma: expected one value or one per sample ({x.shape[0]}), got {sigma.shape[0]}")
        return sigma

    def _bcast(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    # ---- raw network call -------------------------------------------------------------------
    def raw(self, x: torch.Tensor, sigma, step=None, class_labels=None, return_features=False,
            text: "Prompting | None" = None):
        """The network's own output (ε, x0, v or EDM's F) for a σ-space input, plus optional features. A text
        model takes `text` (`encode_prompts`), whose prompts its labels index; with guidance W ≠ 1 the output is
        uncond + W·(cond − uncond), both from one batched call."""
        sigma = self._sigma_batch(x, sigma)
        if self.param == "ve":
            c_in = torch.ones_like(sigma)
        elif self.param == "flow":
            c_in = 1 / (1 + sigma)
        else:
            c_in = 1 / (sigma**2 + (self.schedule.sigma_data**2 if self.param == "edm" else 1.0)).sqrt()
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, dtype=torch.long, device=x.device).reshape(-1)
        x_in, t = x * self._bcast(c_in, x), self.time_input(sigma)
        if self.text is None:
            if text is not None:
                raise FewstepError(NOT_TEXT_CONDITIONED)
            return self.net(x_in, t, step=step, class_labels=class_labels, return_features=return_features)
        if text is None:
            raise prompts_needed()
        context = text.context(class_labels, x.shape[0]).to(x.device, x.dtype)
        # a pooled prompt embedding beside the tokens (SD3, Flux), where the text encoders give one
        pooled = {} if text.pooled is None else {"pooled": text.pooled_context(class_labels, x.shape[0]).to(x.device, x.dtype)}
        if getattr(self.text, "embedded_guidance", False):  # a guidance-distilled network takes the scale as input
            return self.net(x_in, t, step=step, context=context, return_features=return_features,
                            guidance=text.guidance, **pooled)
        if text.guidance == 1.0:
            return self.net(x_in, t, step=step, context=context, return_features=return_features, **pooled)
        if return_features:
            raise FewstepError("features of a guided text model: set guidance 1 first")
        negative = text.negative_embeds.to(x.device, x.dtype).expand(x.shape[0], -1, -1)
        if pooled:
            neg_pooled = text.negative_pooled.to(x.device, x.dtype).expand(x.shape[0], -1)
            pooled = {"pooled": torch.cat([neg_pooled, pooled["pooled"]])}
        both = self.net(torch.cat([x_in, x_in]), torch.cat([t, t]), step=step, context=torch.cat([negative, context]),
                        **pooled)
        uncond, cond = both.chunk(2)
        return uncond + text.guidance * (cond - uncond)

    def take_components(self, other: "Denoiser") -> "Denoiser":
        """The autoencoder and text encoder of `other`, and its guidance defaults (a student built beside its
        teacher)."""
        self.codec, self.text = other.codec, other.text
        self.guidance, self.negative_prompt = other.guidance, other.negative_prompt
        return self

    def encode_prompts(self, prompts: list[str], negative_prompt: str | None = None,
                       guidance: float | None = None) -> "Prompting":
        """A text model's conditioning for one run: the prompts (its labels index them), the negative prompt and
        the guidance scale (None: the card's), encoded once. Nothing is kept on the model."""
        if self.text is None:
            raise FewstepError(NOT_TEXT_CONDITIONED)
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise FewstepError("expected at least one prompt")
        negative_prompt = self.negative_prompt if negative_prompt is None else str(negative_prompt)
        if guidance is None:
            guidance = self.guidance
        elif not 1.0 <= guidance:
            raise FewstepError(f"{option('guidance', guidance)}: expected a scale >= 1 (1: the prompt alone)")
        device = next(self.net.parameters()).device
        emb = self.text.to(device).encode(prompts + [negative_prompt])
        emb, pooled = emb if isinstance(emb, tuple) else (emb, None)
        if negative_prompt == "" and getattr(self.text, "zeros_for_empty_prompt", False):
            # SDXL's pipeline: no negative prompt is zero embeddings, not the encoding of ""
            emb[-1:], pooled[-1:] = 0.0, 0.0
        pooled = (None, None) if pooled is None else (pooled[:-1].to(device), pooled[-1:].to(device))
        return Prompting(tuple(prompts), negative_prompt, float(guidance), emb[:-1].to(device), emb[-1:].to(device),
                         *pooled)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as images: a latent model's latents through its autoencoder, anything else as it is."""
        if self.codec is None:
            return x
        return self.codec.to(x.device).decode(x)

    def raw_to_x0(self, raw: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
        """Convert a raw network output at (x, σ) into the x0 estimate."""
        sigma_64 = self._sigma_batch(x, sigma)
        sigma = self._bcast(sigma_64, x)
        if self.param == "eps":
            return x - sigma * raw
        if self.param == "x0":
            return raw
        if self.param == "ve":
            return x + sigma * raw
        if self.param == "flow":
            # x_t = x/(1 + σ), x0 = x_t − t·v with t = σ/(1 + σ); the coefficients come in float64
            a = self._bcast(1 / (1 + sigma_64), x)
            return a * x - self._bcast(sigma_64 / (1 + sigma_64), x) * raw
        if self.param == "v":
            # VP: x_vp = a·x0 + b·ε, v = a·ε − b·x0, with a = 1/sqrt(1+σ²), b = σ·a  ⇒  x0 = a·x_vp − b·v
            a = 1 / (1 + sigma**2).sqrt()
            return a * (a * x) - sigma * a * raw
        sd = self.schedule.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        return c_skip * x + c_out * raw

    def forward(self, x: torch.Tensor, sigma, step=None, class_labels=None, return_features=False, text=None):
        out = self.raw(x, sigma, step=step, class_labels=class_labels, return_features=return_features, text=text)
        if return_features:
            raw, feats = out
            return self.raw_to_x0(raw, x, sigma), feats
        return self.raw_to_x0(out, x, sigma)

    def eps(self, x: torch.Tensor, sigma, **kw) -> torch.Tensor:
        s = self._bcast(self._sigma_batch(x, sigma), x)
        return (x - self(x, sigma, **kw)) / s

    # ---- sampler-facing helpers --------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of class labels a class-conditional network takes (0: unconditional, or a text model, whose
        labels index the prompts of its `Prompting`)."""
        if self.text is not None:
            return 0
        return int(getattr(self.net, "config", {}).get("num_classes") or 0)

    def check_labels(self, class_labels: torch.Tensor | None, n: int | None = None) -> torch.Tensor | None:
        """Class labels for this model: required (and in range) for a conditional one, refused otherwise."""
        if not self.num_classes:
            if class_labels is not None:
                raise FewstepError("class labels were given, but this model is not class-conditional")
            return None
        if class_labels is None:
            raise FewstepError(f"this model is class-conditional ({self.num_classes} classes): give class labels")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if n is not None and len(labels) != n:
            raise FewstepError(f"class labels: expected {n}, got {len(labels)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise FewstepError(f"class label {int(labels.max() if labels.max() >= self.num_classes else labels.min())}"
                               f": expected 0..{self.num_classes - 1}")
        return labels

    def with_step(self, step: int | None, class_labels: torch.Tensor | None = None, text: "Prompting | None" = None):
        """A plain callable D(x, σ) with the step condition (SFD-v), class labels and a text model's prompts
        bound, for the solvers."""
        if step is None and self.has_step_condition:
            raise FewstepError("this model is step-conditioned (SFD-v): choose one of its trained NFEs")
        if not self.has_step_condition:
            step = None
        if step is None and class_labels is None and text is None:
            return self
        return lambda x, sigma: self(x, sigma, step=step, class_labels=class_labels, text=text)

    def table_sigmas(self) -> torch.Tensor:
        """The model's own noise levels, noisiest first (discrete only)."""
        if not self.schedule.is_discrete:
            raise FewstepError("a continuous model has no step table")
        return self.schedule.sigmas.flip(0)

    def discrete_view(self, T: int | None = None) -> tuple["Denoiser", dict]:
        """This continuous model seen through a discrete table read off it (same network, same
        outputs at every table entry), and how the table was made: see schedule.continuous_table."""

        table, info = continuous_table(self.schedule, T)
        return Denoiser(self.net, table, self.param, exact_table=False).take_components(self), info

    def describe(self) -> dict:
        return {"param": self.param, "exact_table": self.exact_table, "schedule": self.schedule.to_dict()}


@dataclass(frozen=True)
class Prompting:
    """A text model's conditioning for one sampling run or one training batch: the prompts its class labels
    index, the negative prompt, the guidance scale and their embeddings (`Denoiser.encode_prompts`). It travels
    with each call and is never stored on the model, so one call's prompts cannot reach the next."""
    prompts: tuple
    negative_prompt: str
    guidance: float
    embeds: torch.Tensor
    negative_embeds: torch.Tensor
    # one vector a prompt beside its tokens (SD3's and Flux's pooled CLIP embeddings), or None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def context(self, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        """The prompt embeddings of n samples, from their labels (indices into the prompts)."""
        if labels is None:
            if len(self.embeds) != 1:
                raise FewstepError(f"{len(self.embeds)} prompts are set: each sample needs its prompt's index")
            return self.embeds.expand(n, -1, -1)
        return self.embeds[labels.to(self.embeds.device)]

    def pooled_context(self, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        """The pooled prompt embeddings of n samples (text encoders that give one), from their labels."""
        if labels is None:
            return self.pooled.expand(n, -1)
        return self.pooled[labels.to(self.pooled.device)]

    def with_guidance(self, guidance: float) -> "Prompting":
        """The same prompts at another scale (a student beside its guided teacher takes the prompt alone)."""
        return replace(self, guidance=float(guidance))

    def key(self) -> dict:
        """What besides the labels decides a text model's outputs (for caches of its trajectories)."""
        h = hashlib.sha256(json.dumps(list(self.prompts) + [self.negative_prompt]).encode()).hexdigest()
        return {"prompts_sha256": h, "guidance": self.guidance}
