"""Models: the Flax LLaDA backbone (MMaDA-8B, Lumina-DiMOO, small presets), T2I sequence layouts,
the policy glue (``logits_fn`` per docs/architecture.md's model contract), HF checkpoint conversion, VQ decoders.

Submodules are imported explicitly (``from htgrpo_jax.models import llada, layouts, policy``) so
that importing the package stays cheap (layouts pulls in transformers, convert pulls in torch).
"""
