"""bench/openblas_gemm.py: the policy traced with OpenBLAS projections computes what the XLA one does.

docs/performance.md's "An OpenBLAS GEMM inside the step" compares the two forms' speed; that comparison
is only worth reading if the custom call's forward and its hand-written backward (dx = dy W^T,
dW = x^T dy) give the same loss and gradients as ``llada.flat_matmul`` under ``jax.grad``.
"""

import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import train_step as bench_train_step  # noqa: E402

from htgrpo_jax import rl  # noqa: E402
from htgrpo_jax.models import llada  # noqa: E402
from tests.helpers.bench_args import tiny_bench_args  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the FFI library")


@pytest.fixture(scope="module")
def openblas_gemm(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))  # build into the test's own folder
  import openblas_gemm  # noqa: PLC0415

  openblas_gemm.load(threads=1)
  yield openblas_gemm
  mp.undo()


def _loss_and_grad(form):
  args = tiny_bench_args()
  flat = llada.flat_matmul
  llada.flat_matmul = form
  try:
    _, fn, params = bench_train_step.make_policy(args)
    rollout = bench_train_step.make_rollout(args, np.random.default_rng(0))
    target = jax.nn.one_hot(rollout.image_tokens, args.codebook)

    def loss(p):
      logits = fn(p, rollout.prompt_tokens, jnp.where(rollout.commit_step < 2, rollout.image_tokens, rl.MASK))
      return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), -1))

    return jax.jit(jax.value_and_grad(loss))(params)
  finally:
    llada.flat_matmul = flat


def test_openblas_projections_give_the_xla_loss_and_gradients(openblas_gemm):
  want_loss, want = _loss_and_grad(llada.flat_matmul)
  got_loss, got = _loss_and_grad(openblas_gemm.flat_matmul)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = flat_want[path]
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))) + 1e-8, err_msg=str(path))


def test_openblas_matmul_refuses_other_dtypes(openblas_gemm):
  with pytest.raises(TypeError, match="fp32 only"):
    openblas_gemm.flat_matmul(jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 2), jnp.bfloat16), 1)
