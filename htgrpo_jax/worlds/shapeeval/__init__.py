"""The ShapeEval world: GenEval's six tags over coloured shapes on a small canvas.

* ``scenes``          scene sampling and exact rendering (``WorldConfig``, ``render``);
* ``grammar``         the prompt grammar, its metadata and the train/eval splits;
* ``codebook``        the k-means patch codebook (the world's VQ tokenizer: pixels <-> codes);
* ``text_tokenizer``  the word-level text tokenizer of the grammar;
* ``dataset``         the TFDS records (``shape_eval``) and grain pipelines, built once per data_dir;
* ``verifier``        the pixel verifier (GenEval's rules from ``rewards.geneval``), the reward;
* ``reward``          the verifier registered as reward kind ``'shapeeval'`` (``rewards.registry``);
* ``task``            the ``Task`` builder, registered in ``tasks.WORLDS`` as ``'shapes'``.
"""
