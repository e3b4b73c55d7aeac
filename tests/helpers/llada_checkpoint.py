"""A toy LLaDA checkpoint in the HF key layout (safetensors shards + index), written with torch."""

import json
import os

import torch
from safetensors.torch import save_file

from htgrpo_jax.models import convert, llada

CFG = llada.get_config("tiny", vocab_size=96, d_model=32, n_layers=2, n_heads=4, mlp_hidden=48)


def write_llada_checkpoint(path, cfg, seed=0, dtype=torch.float32, drop=(), add=(), reshape=None):
  """Random weights in the LLaDA key layout, split over two shards with an index file."""
  g = torch.Generator().manual_seed(seed)
  d, m, v = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
  rnd = lambda *s: (torch.randn(*s, generator=g) * 0.2)
  sd = {
      "model.transformer.wte.weight": rnd(v, d),
      "model.transformer.ln_f.weight": 1 + rnd(d),
      "model.transformer.ff_out.weight": rnd(v, d),
  }
  for i in range(cfg.n_layers):
    p = f"model.transformer.blocks.{i}."
    sd.update(
        {
            p + "attn_norm.weight": 1 + rnd(d),
            p + "ff_norm.weight": 1 + rnd(d),
            p + "q_proj.weight": rnd(d, d),
            p + "k_proj.weight": rnd(d, d),
            p + "v_proj.weight": rnd(d, d),
            p + "attn_out.weight": rnd(d, d),
            p + "ff_proj.weight": rnd(m, d),
            p + "up_proj.weight": rnd(m, d),
            p + "ff_out.weight": rnd(d, m),
        }
    )
  for k in drop:
    del sd[k]
  for k in add:
    sd[k] = rnd(3)
  if reshape:
    sd[reshape[0]] = rnd(*reshape[1])
  sd = {k: t.to(dtype).contiguous() for k, t in sd.items()}
  keys = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  os.makedirs(path, exist_ok=True)
  for name, ks in shards.items():
    save_file({k: sd[k] for k in ks}, os.path.join(path, name))
  with open(os.path.join(path, convert.INDEX_FILE), "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
  return sd
