"""Worlds: one package per embedded world (its scenes, prompts, tokenizers, data and verifier), each
with a ``task`` module that registers its builder in ``tasks.WORLDS``.

* ``shapeeval/``  the ShapeEval world: GenEval's six tags over coloured shapes on a small canvas.
"""
