"""The head's dropout and attention: torch's results, masks drawn fast on a CPU."""

import pytest
import torch
from torch import nn

from sgmft.models.layers import Attention, Dropout, _keep_scale, attend, dropout, padding_bias

B, LQ, LK, D, HEADS = 4, 7, 9, 32, 4


def padded_context(seed: int = 0):
    torch.manual_seed(seed)
    context = torch.randn(B, LK, D)
    mask = torch.ones(B, LK, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, 2:] = False
    return context, mask


@pytest.mark.parametrize("self_attention", [True, False])
def test_attention_matches_torch_multihead_attention(self_attention):
    context, mask = padded_context()
    query = context if self_attention else torch.randn(B, LQ, D)
    layer = Attention(D, HEADS, dropout=0.3).eval()
    expected = layer.attn(query, context, context, key_padding_mask=~mask, need_weights=False)[0]
    torch.testing.assert_close(layer(query, context, mask), expected, atol=1e-5, rtol=1e-5)


def test_attention_ignores_padded_keys_in_training():
    context, mask = padded_context()
    layer = Attention(D, HEADS, dropout=0.3).train()
    changed = context.clone()
    changed[~mask] = 1e3  # values that would dominate any row that attended to them
    torch.manual_seed(5)
    a = layer(context, context, mask)
    torch.manual_seed(5)
    b = layer(context, changed, mask)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("padded", [True, False])
def test_cpu_attention_with_dropout_is_softmax_times_the_drawn_mask(padded):
    torch.manual_seed(1)
    q, k, v = (torch.randn(B, HEADS, n, D // HEADS, requires_grad=True) for n in (LQ, LK, LK))
    bias = padding_bias(padded_context()[1], q.dtype) if padded else None
    torch.manual_seed(3)
    out = attend(q, k, v, bias, p=0.25)
    torch.manual_seed(3)
    keep = _keep_scale(torch.Size((B, HEADS, LQ, LK)), 0.25, q.dtype)
    scores = q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5
    probs = torch.softmax(scores + bias if padded else scores, dim=-1)
    expected = (probs * keep) @ v
    torch.testing.assert_close(out, expected)
    assert (keep == 0).any() and (keep > 0).any()
    weights = torch.randn_like(out)  # gradients too: the folded matmuls against the formula
    torch.testing.assert_close(torch.autograd.grad((out * weights).sum(), (q, k, v)),
                               torch.autograd.grad((expected * weights).sum(), (q, k, v)))


def test_keep_masks_of_any_size_and_dtype():
    torch.manual_seed(0)
    odd = _keep_scale(torch.Size((3, 7)), 0.5, torch.float32)  # 21 draws: not a whole number of 64-bit words
    assert odd.shape == (3, 7) and set(odd.unique().tolist()) <= {0.0, 2.0}
    half = _keep_scale(torch.Size((5, 3)), 0.5, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and set(half.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_at_its_rate_and_keeps_the_mean(p):
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = dropout(x, p, training=True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.005
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.01


def test_dropout_follows_torch_seed_and_passes_gradients():
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(7)
    a = dropout(x, 0.5, training=True)
    torch.manual_seed(7)
    b = dropout(x, 0.5, training=True)
    c = dropout(x, 0.5, training=True)
    assert torch.equal(a, b) and not torch.equal(b, c)
    a.sum().backward()
    torch.testing.assert_close(x.grad, (a.detach() / x.detach()).where(a.detach() != 0, 0.0))


def test_dropout_is_identity_in_eval_and_the_module_keeps_nn_dropout_arguments():
    x = torch.randn(10)
    assert dropout(x, 0.5, training=False) is x
    layer = Dropout(0.2)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.2 and layer.eval()(x) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros(10))
