"""Independent PyTorch VQ decoders (NCHW, written from docs/models.md, VQ decoders) whose attribute
names give the HF state-dict keys, and a writer of their checkpoints; shared by the VQ tests."""

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from htgrpo_jax.models.vq import magvit2, vqgan

MAG = magvit2.PRESETS["tiny"]
VQG = vqgan.PRESETS["tiny"]


# ------------------------------------------------------------------------------------------------
# Independent torch decoders, written from docs/models.md (VQ decoders) in NCHW; attribute names give the HF
# state-dict keys.


class TResnet(nn.Module):

  def __init__(self, cin, cout, groups, shortcut):
    super().__init__()
    self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
    self.skip = shortcut if cin != cout else None
    if self.skip:
      setattr(self, shortcut, nn.Conv2d(cin, cout, 1))

  def forward(self, x):
    y = self.conv1(F.silu(self.norm1(x)))
    y = self.conv2(F.silu(self.norm2(y)))
    return (getattr(self, self.skip)(x) if self.skip else x) + y


class TAttn(nn.Module):

  def __init__(self, c, groups):
    super().__init__()
    self.norm = nn.GroupNorm(groups, c, eps=1e-6)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    n = self.norm(x)
    q, k, v = (m(n).flatten(2) for m in (self.q, self.k, self.v))  # [B, C, HW]
    att = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c**0.5, dim=-1)
    out = torch.einsum("bij,bcj->bci", att, v).reshape(b, c, h, w)
    return x + self.proj_out(out)


class TUp(nn.Module):

  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TMagvit(nn.Module):
  """MAGVIT-v2: ``decoder.*`` plus the LFQ buffers ``quantize.{embedding,power_vals}``."""

  def __init__(self, c: magvit2.Magvit2Config):
    super().__init__()
    g, top = c.norm_groups, c.ch * c.ch_mult[-1]
    self.quantize = nn.Module()
    bits = [[float(ch == "1") * 2 - 1 for ch in format(i, f"0{c.code_bits}b")] for i in range(2**c.code_bits)]
    self.quantize.register_buffer("embedding", torch.tensor(bits))
    self.quantize.register_buffer("power_vals", 2 ** torch.arange(c.code_bits - 1, -1, -1))
    d = self.decoder = nn.Module()
    d.post_quant_conv = nn.Conv2d(c.code_bits, c.code_bits, 1)
    d.conv_in = nn.Conv2d(c.code_bits, top, 3, padding=1)
    d.mid = nn.Module()
    d.mid.block_1 = TResnet(top, top, g, "nin_shortcut")
    d.mid.attn_1 = TAttn(top, g)
    d.mid.block_2 = TResnet(top, top, g, "nin_shortcut")
    levels, cin = {}, top
    for lvl in reversed(range(len(c.ch_mult))):
      lv = nn.Module()
      cout = c.ch * c.ch_mult[lvl]
      lv.block = nn.ModuleList()
      for _ in range(c.num_res_blocks[lvl]):
        lv.block.append(TResnet(cin, cout, g, "nin_shortcut"))
        cin = cout
      if lvl:
        lv.upsample = TUp(cout)
      levels[lvl] = lv
    d.up = nn.ModuleList([levels[i] for i in range(len(c.ch_mult))])
    d.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
    d.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

  def forward(self, codes):  # [B, h, w] long
    d = self.decoder
    x = self.quantize.embedding[codes].permute(0, 3, 1, 2)
    x = d.conv_in(d.post_quant_conv(x))
    x = d.mid.block_2(d.mid.attn_1(d.mid.block_1(x)))
    for lvl in range(len(d.up) - 1, -1, -1):
      for blk in d.up[lvl].block:
        x = blk(x)
      if lvl:
        x = d.up[lvl].upsample(x)
    x = d.conv_out(F.silu(d.norm_out(x)))
    return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # [B, H, W, 3] in [0, 1]


class TVQGAN(nn.Module):
  """diffusers VQModel decode path: ``quantize.embedding``, ``post_quant_conv``, ``decoder.*``."""

  def __init__(self, c: vqgan.VQGANConfig):
    super().__init__()
    g, lat = c.norm_num_groups, c.latent_channels
    rev = list(c.block_out_channels[::-1])
    self.quantize = nn.Module()
    self.quantize.embedding = nn.Embedding(c.num_vq_embeddings, lat)
    self.post_quant_conv = nn.Conv2d(lat, lat, 1)
    d = self.decoder = nn.Module()
    d.conv_in = nn.Conv2d(lat, rev[0], 3, padding=1)
    d.mid_block = nn.Module()
    d.mid_block.resnets = nn.ModuleList([TResnet(rev[0], rev[0], g, "conv_shortcut") for _ in range(2)])
    d.up_blocks = nn.ModuleList()
    prev = rev[0]
    for i, out in enumerate(rev):
      blk = nn.Module()
      blk.resnets = nn.ModuleList(
          [TResnet(prev if j == 0 else out, out, g, "conv_shortcut") for j in range(c.layers_per_block + 1)]
      )
      if i < len(rev) - 1:
        blk.upsamplers = nn.ModuleList([TUp(out)])
      d.up_blocks.append(blk)
      prev = out
    d.conv_norm_out = nn.GroupNorm(g, prev, eps=1e-6)
    d.conv_out = nn.Conv2d(prev, 3, 3, padding=1)

  def forward(self, codes):
    d = self.decoder
    x = self.post_quant_conv(self.quantize.embedding(codes).permute(0, 3, 1, 2))
    x = d.conv_in(x)
    for r in d.mid_block.resnets:
      x = r(x)
    for blk in d.up_blocks:
      for r in blk.resnets:
        x = r(x)
      if hasattr(blk, "upsamplers"):
        x = blk.upsamplers[0](x)
    x = d.conv_out(F.silu(d.conv_norm_out(x)))
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def randomize(model, seed=0):
  """Random weights of unit-scale activations: conv ~ N(0, 1/fan_in), norms/biases perturbed."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if p.ndim == 4:
        p.copy_(r / np.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * r)
      else:
        p.copy_(r * (1.0 if p.ndim == 2 else 0.2))  # codebook rows ~ N(0, 1), biases small
  return model.eval()


def write_ckpt(path, model, drop=(), add=(), reshape=None, encoder=True):
  """The model's state dict (HF key layout) as one safetensors file, with optional corruption."""
  sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  if encoder:  # real checkpoints carry the encoder; the converter must skip it
    sd["encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)
  for k in drop:
    del sd[k]
  for k in add:
    sd[k] = torch.zeros(3)
  if reshape:
    sd[reshape[0]] = torch.zeros(reshape[1])
  save_file(sd, str(path))
  return str(path)
