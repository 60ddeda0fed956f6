"""SFTModule: a causal LM, a loss strategy, AdamW with warmup + cosine, validation by generation.

Optimization is manual so each optimizer step sees all of its micro-batches at once: the loss is
divided by the target-token count of the whole step (every micro-batch, every rank) before any
backward pass. Lightning's automatic accumulation divides each micro-batch's mean by the number
of micro-batches instead, which weighs tokens of short micro-batches more (transformers #34191).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from talr.generation import greedy_generate
from talr.losses import build_loss
from talr.models import TokenNLLModel, load_model, load_tokenizer
from talr.tasks.base import Verdict
from talr.token_loss import sequence_mean_losses


class SFTModule(L.LightningModule):
    """Domain SFT of a causal LM with a pluggable loss strategy.

    Args:
        model: hub id, local directory, or the embedded alias `smollm2-135m-instruct`.
        loss: registered loss strategy name (`ce`, `talr`, ...); see talr.losses.LOSSES.
        loss_options: keyword options of that strategy (for talr: w_min, tau).
        learning_rate: peak AdamW learning rate (after linear warmup, then cosine decay to 0).
        warmup_ratio: share of optimizer steps spent warming up.
        max_new_tokens: generation budget when scoring validation/test answers.
        generate: score domain accuracy by greedy generation during validation and test.
        dtype: `auto` (float32 on CPU, bfloat16 on GPU), `float32`, `bfloat16`, `float16`.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        loss: str = "talr",
        loss_options: dict[str, Any] | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        gradient_clip_val: float | None = 1.0,
        max_new_tokens: int = 256,
        generate: bool = True,
        dtype: str = "auto",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        if not learning_rate > 0:
            raise ValueError(f"model.learning_rate must be positive, got {learning_rate}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if max_new_tokens < 1:
            raise ValueError(f"model.max_new_tokens must be at least 1, got {max_new_tokens}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.loss_fn = build_loss(loss, loss_options)  # fails before any model is loaded
        self.net: TokenNLLModel | None = None
        self.tokenizer: Any = None
        self.val_history: list[dict[str, float]] = []
        self._eval_records: list[tuple[int, Verdict, str]] = []
        self._eval_nll = [0.0, 0]  # summed NLL, target tokens

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.net is not None:
            return
        hp = self.hparams
        lm = load_model(hp.model, hp.dtype, hp.gradient_checkpointing, hp.trust_remote_code, hp.attn_implementation)
        lm.train()  # from_pretrained returns eval mode; dropout-bearing models must train in train mode
        self.net = TokenNLLModel(lm)
        self.tokenizer = load_tokenizer(hp.model, hp.trust_remote_code)

    @property
    def lm(self) -> torch.nn.Module:
        assert self.net is not None, "configure_model() has not run"
        return self.net.lm

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        # Decay matrices only: decaying norms and biases hurts and is not what the paper's AdamW runs do.
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, betas=tuple(self.hparams.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(self.hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, warmup=warmup, total=total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- training --------------------------------------------------------------------------------
    def global_token_count(self, local: int) -> torch.Tensor:
        count = torch.tensor(float(local), device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
        return count

    def step_sequence_losses(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Mean loss of every sequence of this optimizer step, on all ranks (NaN: no targets).

        With several micro-batches this is a no-grad pass ahead of the real one (about one extra
        forward): a strategy like TALR needs the step's median before weighting any token.
        """
        with torch.no_grad():
            local = torch.cat([
                sequence_mean_losses(*self.net(m["input_ids"], m["attention_mask"], m["labels"]), m["input_ids"].shape[0])
                for m in micro_batches
            ])
        if self.trainer.world_size > 1:
            local = self.all_gather(local).reshape(-1)
        return local

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        micro_batches = batch["micro_batches"]
        tokens = self.global_token_count(batch["num_target_tokens"])
        # Backends average gradients over ranks; multiply back so the step's loss is sum / all tokens.
        scale = self.trainer.world_size / tokens.clamp_min(1.0)
        step_losses = None
        if self.loss_fn.uses_step_losses and (len(micro_batches) > 1 or self.trainer.world_size > 1):
            step_losses = self.step_sequence_losses(micro_batches)
        weighted_sum = torch.zeros((), device=self.device)
        nll_sum = torch.zeros((), device=self.device)
        strategy_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        for micro in micro_batches:
            nll, seq_index = self.net(micro["input_ids"], micro["attention_mask"], micro["labels"])
            out = self.loss_fn(nll, seq_index, micro["input_ids"].shape[0], step_losses)
            self.manual_backward(out.total * scale)
            weighted_sum += out.total.detach()
            nll_sum += nll.detach().sum()
            for key, value in out.metrics.items():
                strategy_metrics[key].append(value)
        if self.hparams.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        local_tokens = max(batch["num_target_tokens"], 1)
        loss = weighted_sum / local_tokens
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/nll", nll_sum / local_tokens)
        self.log("train/lr", scheduler.get_last_lr()[0])
        self.log("train/target_tokens", tokens, reduce_fx="sum")
        for key, values in strategy_metrics.items():
            self.log(f"train/{self.hparams.loss}/{key}", torch.stack(values).float().mean())
        return loss

    # -- validation and test ---------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any]) -> None:
        nll, _ = self.net(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self._eval_nll[0] += float(nll.sum())
        self._eval_nll[1] += int(nll.numel())
        if not self.hparams.generate:
            return
        texts = greedy_generate(self.lm, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"], self.hparams.max_new_tokens)
        rows = self.trainer.datamodule.rows(self._split)
        task = self.trainer.datamodule.task_for(self._split)
        for index, text in zip(batch["row_index"].tolist(), texts):
            self._eval_records.append((index, task.score(text, rows[index]), text))

    def _gather(self) -> tuple[list[tuple[int, Verdict, str]], float, int]:
        records, (nll_sum, count) = self._eval_records, self._eval_nll
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (records, nll_sum, count))
            records = [r for part in gathered for r in part[0]]
            nll_sum, count = sum(p[1] for p in gathered), sum(p[2] for p in gathered)
            # A distributed sampler pads with repeats: score each row once.
            records = list({r[0]: r for r in records}.values())
        return records, nll_sum, count

    def _eval_epoch_end(self) -> dict[str, float]:
        records, nll_sum, count = self._gather()
        metrics = {"loss": nll_sum / max(count, 1)}
        if records:
            records.sort(key=lambda r: r[0])
            rows = self.trainer.datamodule.rows(self._split)
            task = self.trainer.datamodule.task_for(self._split)
            metrics.update(task.summarize([r[1] for r in records], [rows[r[0]] for r in records]))
            self._write_generations(records, rows)
        prefix = "val" if self._split == "val" else "test"
        self.log_dict({f"{prefix}/{k}": float(v) for k, v in metrics.items()}, sync_dist=False)
        self._eval_records, self._eval_nll = [], [0.0, 0]
        return metrics

    def _write_generations(self, records: list[tuple[int, Verdict, str]], rows: list[dict]) -> None:
        """Every scored generation as JSONL beside the logs: what the model said, not just the score."""
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or self.trainer.log_dir is None:
            return
        out = Path(self.trainer.log_dir) / "generations" / f"{self._split}_step{self.global_step:06d}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for index, verdict, text in records:
                f.write(json.dumps({"row_index": index, "correct": verdict.correct, "parsed": verdict.parsed,
                                    "answer": verdict.answer, "generation": text}) + "\n")

    def on_validation_epoch_start(self) -> None:
        self._split = "val"
        self._eval_records, self._eval_nll = [], [0.0, 0]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self._eval_epoch_end()
        if self.trainer.sanity_checking:
            return
        entry = {"step": float(self.global_step), "loss": metrics["loss"]}
        if "accuracy" in metrics:
            entry.update(accuracy=metrics["accuracy"], unparsed=metrics["unparsed"], count=metrics["count"])
        self.val_history.append(entry)
        rank_zero_info(f"[validation] step {self.global_step}: " + _describe(entry))

    def on_test_epoch_start(self) -> None:
        self._split = "test"
        self._eval_records, self._eval_nll = [], [0.0, 0]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        metrics = self._eval_epoch_end()
        rank_zero_info("[test] " + _describe(metrics))

    def on_fit_end(self) -> None:
        if len(self.val_history) >= 2 and "accuracy" in self.val_history[0]:
            first, best = self.val_history[0], max(self.val_history, key=lambda e: e.get("accuracy", -1.0))
            rank_zero_info(
                f"[talr] domain accuracy before fine-tuning: {first['accuracy']:.3f}; "
                f"best after: {best['accuracy']:.3f} (step {int(best['step'])}); "
                f"last: {self.val_history[-1]['accuracy']:.3f}"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["talr_val_history"] = self.val_history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_history = list(checkpoint.get("talr_val_history", []))


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup that starts above zero (the first step learns), then cosine to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _describe(metrics: dict[str, float]) -> str:
    parts = []
    if "accuracy" in metrics:
        n = int(metrics["count"])
        parts.append(f"accuracy {metrics['accuracy']:.3f} ({round(metrics['accuracy'] * n)}/{n}, unparsed {int(metrics['unparsed'])})")
    parts.append(f"target NLL {metrics['loss']:.4f}")
    return ", ".join(parts)
