"""htgrpo_jax: HT-GRPO ("Sketch Then Paint") for diffusion multimodal LLMs in JAX/Flax.

``from htgrpo_jax import rl, sampling`` needs only the core install (jax, flax, optax, chex, numpy);
the trainer, worlds, converters and reporting need ``pip install htgrpo_jax[train]``. Importing this
package imports nothing: every submodule is imported explicitly.
"""

__version__ = "0.1.0"
