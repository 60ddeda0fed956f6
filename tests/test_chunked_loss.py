"""The chunked linear + cross-entropy against the plain full-logits computation, in float64."""

import statistics

import pytest
import torch
import torch.nn.functional as F

from talr.losses import DFT, TALR, CrossEntropy, TokenBatch
from talr.token_loss import IGNORE_INDEX, target_token_nll


def shapes(seed: int, vocab: int = 37, hidden: int = 8, softcap: float | None = None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 9, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (3, 9), generator=g)
    labels[0, :4] = IGNORE_INDEX  # prompt positions
    labels[1, :] = IGNORE_INDEX  # a row with no target at all
    labels[2, :2] = IGNORE_INDEX
    return h, w, b, labels


def naive_nll(h, w, b, labels, softcap=None):
    """Every position's logits, shifted labels, cross_entropy with ignore_index: no talr code."""
    logits = h[:, :-1] @ w.T + b
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    nll = F.cross_entropy(logits.reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1), reduction="none",
                          ignore_index=IGNORE_INDEX)
    keep = labels[:, 1:].reshape(-1) != IGNORE_INDEX
    return nll[keep]


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("strategy", [CrossEntropy(), TALR(), DFT()], ids=["ce", "talr", "dft"])
def test_chunked_loss_and_gradients_equal_the_full_logits_computation(chunk_size, softcap, strategy):
    h, w, b, labels = shapes(0, softcap=softcap)
    reference = naive_nll(h, w, b, labels, softcap)
    nll, seq_index = target_token_nll(h, w, labels, bias=b, logit_softcap=softcap, chunk_size=chunk_size)
    assert torch.allclose(nll, reference, rtol=1e-12, atol=1e-12)

    def weighted(token_nll):
        # the strategy's own weights are detached functions of the token losses themselves
        return strategy(TokenBatch(token_nll, seq_index, 3)).total

    expected = grads(weighted(reference), h, w, b)
    got = grads(weighted(nll), h, w, b)
    for e, g_ in zip(expected, got):
        assert torch.allclose(g_, e, rtol=1e-10, atol=1e-12)


def test_chunked_weights_come_from_the_losses_like_the_hand_written_talr_formula():
    h, w, b, labels = shapes(1)
    nll, seq_index = target_token_nll(h, w, labels, bias=b, chunk_size=3)
    per_seq = [nll[seq_index == s].mean().item() for s in seq_index.unique().tolist()]
    tau = statistics.median(per_seq)  # rows without targets have no mean and no say
    weights = torch.clamp(torch.exp(-nll.detach() / tau), min=0.01)
    expected = grads((weights * naive_nll(h, w, b, labels)).sum(), h, w)
    got = grads(TALR(w_min=0.01)(TokenBatch(nll, seq_index, 3)).total, h, w)
    for e, g_ in zip(expected, got):
        assert torch.allclose(g_, e, rtol=1e-10, atol=1e-12)


def test_bfloat16_parameters_keep_their_dtype_and_track_float32():
    h, w, b, labels = shapes(2)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    nll, _ = target_token_nll(hb, wb, labels, chunk_size=5)
    plain, _ = target_token_nll(hb, wb, labels)
    assert nll.dtype == plain.dtype == torch.float32 and torch.allclose(nll, plain)
    gh, gw = grads(nll.sum(), hb, wb)
    ph, pw = grads(plain.sum(), hb, wb)
    assert gh.dtype == gw.dtype == torch.bfloat16
    assert torch.allclose(gh.float(), ph.float(), rtol=2e-2, atol=2e-2)
    assert torch.allclose(gw.float(), pw.float(), rtol=2e-2, atol=5e-2)


def test_chunked_loss_refuses_to_hand_out_logits():
    h, w, b, labels = shapes(3)
    with pytest.raises(ValueError, match="never holds all logits"):
        target_token_nll(h, w, labels, return_logits=True, chunk_size=4)
