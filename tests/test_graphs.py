"""The step-mode ladder's bucket bookkeeping on a CPU: the SDPA backend chosen per bucket."""

import torch
import torch.nn.functional as F

from model.engines.graphs import BucketedStep, sdpa_backend


def attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_each_bucket_runs_the_first_sdpa_backend_that_runs_its_step():
    """The memory-efficient kernel exists only on CUDA: on a CPU the choice falls through to the next backend, and
    every later run of the bucket uses that one."""
    torch.manual_seed(0)
    step = BucketedStep(attention, "padded", name="attention")
    args = {batch: (*torch.randn(3, batch, 2, 4, 8).unbind(), torch.rand(batch, 1, 4, 4) > 0.3) for batch in (1, 2)}
    step.prepare((((batch,), args[batch]) for batch in (2, 1)), torch.device("cpu"), backends=("EFFICIENT_ATTENTION", "MATH"))
    assert {key: bucket.sdpa_backend for key, bucket in step.buckets.items()} == {(2,): "MATH", (1,): "MATH"}
    assert step.stats().sdpa_backends == {"MATH": 2} and step.stats().eager_fallback_buckets == 0
    out = step((2,), *args[2])
    with sdpa_backend("MATH"):
        assert torch.equal(out, attention(*args[2]))
    # The backend shows in the bits (why a bucket's graph and its padded eager step must use the same one).
    assert not torch.equal(out, attention(*args[2]))
    assert step.buckets[(2,)].steps == 1
