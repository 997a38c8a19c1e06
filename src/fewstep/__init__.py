"""fewstep: turn a many-step diffusion model into a fast few-step sampler."""
__version__ = "0.1.0"
