"""The paper's baselines (DFT, FLOW, L2, KL, LoRA) against independent computations."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from cli import build_cli
from talr.losses import DFT, FLOW, KLToInitial, L2Anchor, TALR, TokenBatch, flow_weights
from talr.models import TokenNLLModel, export_pretrained, is_peft, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def logits_and_targets(seed, n=9, vocab=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2,
            torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2,
            torch.randint(0, vocab, (n,), generator=g))


def test_dft_scales_each_token_by_its_detached_probability():
    logits, _, targets = logits_and_targets(0)
    leaf = logits.clone().requires_grad_(True)
    nll = F.cross_entropy(leaf, targets, reduction="none")
    out = DFT()(TokenBatch(nll, torch.zeros(9, dtype=torch.long), 1))
    probs = [math.exp(row[t]) / sum(math.exp(x) for x in row) for row, t in zip(logits.tolist(), targets.tolist())]
    assert out.total.item() == pytest.approx(sum(-p * math.log(p) for p in probs), rel=1e-12)
    out.total.backward()
    ref = logits.clone().requires_grad_(True)
    (torch.tensor(probs, dtype=torch.float64) * F.cross_entropy(ref, targets, reduction="none")).sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_flow_weights_from_known_sequence_losses():
    losses = torch.tensor([0.5, 1.0, 2.0, 4.0, float("nan")], dtype=torch.float64)
    weights, tau = flow_weights(losses)
    assert tau.item() == pytest.approx(1.5)  # median of the four finite losses
    expected = [math.exp(-x / 1.5) for x in (0.5, 1.0, 2.0, 4.0)] + [0.0]
    assert weights.tolist() == pytest.approx(expected)
    fixed, tau = flow_weights(losses, tau=0.0643)  # the value one of FLOW's run scripts uses
    assert fixed[0].item() == pytest.approx(math.exp(-0.5 / 0.0643)) and tau.item() == pytest.approx(0.0643)

    # the training loss: sum over sequences of w_s * (sum of their token NLLs), not renormalised
    nll = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    seq = torch.tensor([0, 0, 1, 1])
    out = FLOW()(TokenBatch(nll, seq, 2, seq_weights=torch.tensor([0.5, 2.0], dtype=torch.float64)))
    assert out.total.item() == pytest.approx(0.5 * 0.3 + 2.0 * 0.7)


def test_kl_k3_and_exact_match_float64_references():
    logits, ref_logits, targets = logits_and_targets(1)
    nll = F.cross_entropy(logits, targets, reduction="none")
    ref_nll = F.cross_entropy(ref_logits, targets, reduction="none")
    seq = torch.zeros(9, dtype=torch.long)
    k3 = KLToInitial(beta=0.5, estimator="k3")
    out = k3(TokenBatch(nll, seq, 1, ref_nll=ref_nll))
    expected = 0.0
    for row, ref_row, t in zip(logits.tolist(), ref_logits.tolist(), targets.tolist()):
        p = math.exp(row[t]) / sum(math.exp(x) for x in row)
        q = math.exp(ref_row[t]) / sum(math.exp(x) for x in ref_row)
        expected += q / p - math.log(q / p) - 1
    assert out.total.item() == pytest.approx(nll.sum().item() + 0.5 * expected, rel=1e-7)

    exact = KLToInitial(beta=0.5, estimator="exact")
    assert exact.needs.logits and exact.needs.reference
    out = exact(TokenBatch(nll, seq, 1, ref_nll=ref_nll, logits=logits, ref_logits=ref_logits))
    expected = 0.0
    for row, ref_row in zip(logits.tolist(), ref_logits.tolist()):
        zp, zq = sum(math.exp(x) for x in row), sum(math.exp(x) for x in ref_row)
        expected += sum(math.exp(a) / zp * ((a - math.log(zp)) - (b - math.log(zq))) for a, b in zip(row, ref_row))
    assert out.total.item() == pytest.approx(nll.sum().item() + 0.5 * expected, rel=1e-7)
    assert out.metrics["kl"].item() == pytest.approx(expected / 9, rel=1e-10)


def test_kl_wraps_talr_so_talr_plus_kl_is_a_config():
    strategy = KLToInitial(beta=0.2, base=TALR(w_min=0.05))
    assert isinstance(strategy.base, TALR) and strategy.base.w_min == 0.05 and strategy.needs.step_losses
    nll = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    seq = torch.tensor([0, 1, 1])
    out = strategy(TokenBatch(nll, seq, 2, ref_nll=nll.clone()))  # reference == model: KL term 0
    assert out.total.item() == pytest.approx(TALR(w_min=0.05)(TokenBatch(nll, seq, 2)).total.item())
    with pytest.raises(ValueError, match="base must be a token strategy"):
        L2Anchor(base=KLToInitial())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_l2_gradient_is_lambda_times_the_distance_to_the_initial_weights(reduction):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    anchors = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    strategy = L2Anchor(lam=0.3, reduction=reduction)
    params = list(model.parameters())
    metrics = strategy.add_anchor_gradients(params, anchors)
    count = sum(p.numel() for p in params)
    coef = 0.3 / count if reduction == "mean" else 0.3
    for p, a in zip(params, anchors):
        torch.testing.assert_close(p.grad, coef * (p.detach() - a))
    # the same as autograd through the written-out penalty
    squared = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
    assert metrics["distance"].item() == pytest.approx(math.sqrt(squared.item()), rel=1e-6)
    assert metrics["penalty"].item() == pytest.approx(0.5 * coef * squared.item(), rel=1e-6)
    for p in params:
        p.grad = None
    (0.5 * coef * squared).backward()
    for p, a in zip(params, anchors):
        torch.testing.assert_close(p.grad, coef * (p.detach() - a))


def test_lora_trains_adapters_only_and_exports_a_merged_plain_model(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), dtype="float32", lora={"r": 4, "alpha": 8})
    assert is_peft(lm)
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # move the adapters away from their zero start
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    mask, labels = torch.ones_like(ids), ids.clone()
    net = TokenNLLModel(lm)
    nll, _ = net(ids, mask, labels)
    with lm.disable_adapter():  # the KL reference: the initial model, no second copy
        ref_nll, _ = net(ids, mask, labels)
    base_nll, _ = TokenNLLModel(load_model(str(tiny_model_dir), dtype="float32"))(ids, mask, labels)
    torch.testing.assert_close(ref_nll, base_nll)
    assert not torch.allclose(nll, ref_nll)

    out = export_pretrained(lm, load_tokenizer(str(tiny_model_dir)), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not is_peft(merged) and not any("lora" in n for n in merged.state_dict())
    merged_nll, _ = TokenNLLModel(merged)(ids, mask, labels)
    torch.testing.assert_close(merged_nll, nll, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no option.*rank"):
        load_model(str(tiny_model_dir), lora={"rank": 4})


def fit(tiny_model_dir, out, *extra):
    return build_cli([
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.model", str(tiny_model_dir),
        "--model.generate", "false", "--data.task.init_args.num_synthetic", "16", "--data.val_size", "4",
        "--data.batch_size", "4", "--data.micro_batch_size", "2", "--trainer.max_steps", "2",
        "--validate_before_fit", "false",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out), *extra,
    ])


def test_flow_prepass_weights_equal_an_independent_pass_and_are_cached(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TALR_CACHE", str(tmp_path / "cache"))
    cli = fit(tiny_model_dir, tmp_path / "a", "--model.loss", "FLOW")
    weights = cli.model.flow_weights
    data = cli.datamodule.datasets["train"]
    lm = load_model(str(tiny_model_dir), dtype="float32")
    losses = []
    for e in data.examples:  # one sequence at a time, no padding: independent of the batched pass
        ids = torch.tensor([e.input_ids])
        logits = lm(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(e.labels[1:])
        keep = targets != -100
        losses.append(F.cross_entropy(logits[keep], targets[keep]).item())
    tau = sorted(losses)[len(losses) // 2 - 1: len(losses) // 2 + 1]
    tau = sum(tau) / 2 if len(losses) % 2 == 0 else sorted(losses)[len(losses) // 2]
    expected = torch.zeros_like(weights)
    for e, loss in zip(data.examples, losses):
        expected[e.row_index] = math.exp(-loss / tau)
    torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-6)
    assert len(list((tmp_path / "cache" / "flow").glob("*.pt"))) == 1
    assert cli.trainer.global_step == 2

    # a second run loads the cached losses instead of running the pass again
    import talr.flow_prepass

    def fail(*args, **kwargs):
        raise AssertionError("the pre-pass ran again")

    monkeypatch.setattr(talr.flow_prepass, "score_examples", fail)
    again = fit(tiny_model_dir, tmp_path / "b", "--model.loss", "FLOW")
    torch.testing.assert_close(again.model.flow_weights, weights)


def test_l2_and_kl_runs_log_their_terms(tiny_model_dir, tmp_path):
    l2 = fit(tiny_model_dir, tmp_path / "l2", "--model.loss", "L2Anchor", "--model.loss.lam", "0.01",
             "--model.anchor_device", "cpu", "--model.anchor_dtype", "bfloat16")
    assert all(a.device.type == "cpu" and a.dtype == torch.bfloat16 for a in l2.model._anchors)
    distance = l2.trainer.callback_metrics["train/l2/distance"].item()
    initial = load_model(str(tiny_model_dir), dtype="float32").state_dict()
    trained = l2.model.lm.state_dict()
    direct = math.sqrt(sum(((trained[k] - initial[k]) ** 2).sum().item() for k in initial if k != "lm_head.weight"))
    # logged before the last optimizer step moved the weights: within one step of the final distance
    assert 0 < distance <= direct * 1.5
    kl = fit(tiny_model_dir, tmp_path / "kl", "--model.loss", "KLToInitial", "--model.loss.beta", "0.5",
             "--model.loss.estimator", "exact")
    assert kl.trainer.callback_metrics["train/kl/kl"].item() >= 0
