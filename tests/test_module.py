"""SFTModule: exact gradient accumulation, schedule, and the training step against a reference."""

import math
import statistics

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from talr.data import SFTDataModule
from talr.losses import TALR, CrossEntropy, KLToInitial
from talr.models import load_model
from talr.module import SFTModule
from talr.schedule import warmup_cosine
from talr.tasks import MedCalc
from talr.token_loss import IGNORE_INDEX


class GradientRecorder(L.Callback):
    """Copies every gradient just before the first optimizer step."""

    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def make_data(model_dir, micro_batch_size, batch_size=4):
    task = MedCalc(source="synthetic", num_synthetic=12, seed=1, calculators=["map", "bmi", "anion_gap"])
    return SFTDataModule(task, tokenizer=str(model_dir), max_length=512, val_size=4,
                         batch_size=batch_size, micro_batch_size=micro_batch_size, seed=0)


def first_step_gradients(model_dir, loss, micro_batch_size, loss_chunk_size=None):
    torch.manual_seed(0)
    strategy = {"ce": CrossEntropy(), "talr": TALR()}[loss]
    module = SFTModule(model=str(model_dir), loss=strategy, learning_rate=1e-3, generate=False, gradient_clip_val=None,
                       loss_chunk_size=loss_chunk_size)
    recorder = GradientRecorder()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, datamodule=make_data(model_dir, micro_batch_size))
    return recorder.grads


def reference_gradients(model_dir, loss):
    """One padded batch of the same 4 rows through the plain HF model; the loss written out here."""
    data = make_data(model_dir, micro_batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))["micro_batches"][0]
    lm = load_model(str(model_dir), dtype="float32")
    lm.train()
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    token_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp_min(0), reduction="none")
    mask = targets != IGNORE_INDEX
    if loss == "ce":
        weights = mask.float()
    else:
        per_seq = [token_nll[b][mask[b]].mean().item() for b in range(mask.shape[0])]
        tau = statistics.median(per_seq)
        weights = torch.where(mask, torch.exp(-token_nll.detach() / tau).clamp_min(0.01), torch.zeros_like(token_nll))
    total = (weights * token_nll).sum() / mask.sum()
    total.backward()
    return {f"net.lm.{n}": p.grad for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["ce", "talr"])
def test_accumulation_gives_the_one_large_batch_gradient(tiny_model_dir, loss):
    reference = reference_gradients(tiny_model_dir, loss)
    # micro-batches of 4, 2 and 1 rows; and the chunked vocabulary projection (37 target tokens at a time)
    for micro, chunk in ((4, None), (2, None), (1, None), (2, 37)):
        grads = first_step_gradients(tiny_model_dir, loss, micro, chunk)
        assert set(grads) == set(reference)
        for name, ref in reference.items():
            torch.testing.assert_close(grads[name], ref, rtol=2e-4, atol=2e-7, msg=f"{loss} micro={micro} chunk={chunk} {name}")


def test_warmup_cosine_starts_above_zero_and_ends_at_zero():
    total, warmup = 100, 10
    values = [warmup_cosine(s, warmup, total) for s in range(total + 1)]
    assert values[0] == pytest.approx(1 / 11) and values[0] > 0
    assert values[warmup] == pytest.approx(1.0)
    assert values[warmup + 45] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert values[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))


def test_bad_module_options_fail_before_loading_a_model():
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        SFTModule(model="/nonexistent", learning_rate=-1e-5)
    with pytest.raises(TypeError, match="model.loss must be a loss strategy.*'focal'"):
        SFTModule(model="/nonexistent", loss="focal")
    with pytest.raises(TypeError, match="temperature"):
        SFTModule(model="/nonexistent", loss=TALR(temperature=1.0))
    with pytest.raises(ValueError, match="needs full logits"):
        SFTModule(model="/nonexistent", loss=KLToInitial(estimator="exact"), loss_chunk_size=512)
    with pytest.raises(ValueError, match="loss_chunk_size must be a positive"):
        SFTModule(model="/nonexistent", loss_chunk_size=0)
