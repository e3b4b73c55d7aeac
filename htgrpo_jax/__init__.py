"""htgrpo_jax: HT-GRPO ("Sketch Then Paint") for diffusion multimodal LLMs in JAX/Flax."""

__version__ = "0.1.0"
