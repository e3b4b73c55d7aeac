"""ShapeEval world (scenes, VQ tokenizer, prompt grammar, text tokenizer) and prompt datasets."""
