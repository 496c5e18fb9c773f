"""stylelora: teach a Stable Diffusion model a style or a character with LoRA adapters."""

__version__ = "0.1.0"
