"""geovlm.sft.token_nll_sum: only labelled positions reach lm_head, the loss is unchanged.

Oracle: float64 ``log_softmax`` of HF's own full logits (``model(**inputs).logits``, every
position), gathered at the labels, summed; and its gradients for every parameter. Both paths of
``token_nll_sum`` (the model's forward with ``logits_to_keep`` positions, and the fused linear
kernel on the labelled hidden states), on padded and packed batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geovlm.data.collate import collate_sft, pad_token_id
from geovlm.data.packing import sequence_lengths
from geovlm.packed import pack_for_model
from geovlm.sft import token_nll_sum
from tests.test_model import make_sample, tiny_policy


@pytest.fixture(scope="module")
def policy():
    model, processor = tiny_policy(seed=9)
    return model.double(), processor


@pytest.fixture(scope="module")
def batch(policy):
    rng = np.random.default_rng(4)
    sizes = [((112, 112),), ((84, 140), (112, 112)), ((140, 112),), ((112, 84),)]
    samples = [make_sample(rng, i, s) for i, s in enumerate(sizes)]
    return collate_sft(samples, policy[1], 4096)


def oracle(model, batch) -> torch.Tensor:
    """Sum of -log p(label) from every position's logits, float64."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.double()[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logps = torch.log_softmax(logits, dim=-1)[keep].gather(1, targets[keep][:, None])
    return -logps.sum()


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    found = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: g for n, g in zip(params, found, strict=True) if g is not None}


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits-to-keep", "fused-linear"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_nll_and_gradients_equal_the_full_logits(policy, batch, fused_linear, packed):
    model, processor = policy
    model.train()
    if packed:
        lengths = sequence_lengths(batch)
        batch = pack_for_model(model, batch, sum(lengths), pad_token_id(processor))
        assert batch["input_ids"].shape[0] == 1
    want = oracle(model, batch)
    nll, count = token_nll_sum(model, batch, fused_linear=fused_linear)
    assert count == int((batch["labels"][:, 1:] != -100).sum()) > 0
    torch.testing.assert_close(nll.double(), want, rtol=1e-6, atol=1e-8)
    expected, got = grads_of(model, want), grads_of(model, nll)
    assert expected.keys() == got.keys() and any(n.startswith("model.visual") for n in got)
    for name, grad in expected.items():
        scale = float(grad.abs().max())
        # RMSNorm / RoPE compute in float32 inside the float64 model.
        torch.testing.assert_close(got[name].double(), grad, rtol=1e-5, atol=1e-6 * scale)


def test_prompt_positions_never_reach_lm_head(policy, batch):
    """What the change is for: lm_head sees only the positions that carry a label."""
    model, _ = policy
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            token_nll_sum(model, batch)
    finally:
        handle.remove()
    labelled_positions = int((batch["labels"][:, 1:] != -100).any(dim=0).sum())
    hidden = model.config.text_config.hidden_size
    assert seen == [torch.Size([batch["input_ids"].shape[0], labelled_positions, hidden])]
    assert labelled_positions < batch["input_ids"].shape[1] / 2
