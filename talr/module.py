"""SFTModule: a causal LM, a loss strategy, AdamW with warmup + cosine, validation by generation.

Optimization is manual so each optimizer step sees all of its micro-batches at once: the loss is
divided by the target-token count of the whole step (every micro-batch, every rank) before any
backward pass. Lightning's automatic accumulation divides each micro-batch's mean by the number
of micro-batches instead, which weighs tokens of short micro-batches more (transformers #34191).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import math
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tqdm.auto import tqdm

from talr.generation import generate_texts
from talr.data import pad_examples
from talr.losses import FLOW, TALR, LossStrategy, TokenBatch, flow_weights
from talr.models import TokenNLLModel, cache_dir, eval_mode, is_peft, load_model, load_tokenizer, resolve_dtype
from talr.results import refuse_to_overwrite, resumes_its_own_run, write_atomic
from talr.tasks.base import Verdict
from talr.token_loss import sequence_mean_losses


class SFTModule(L.LightningModule):
    """Domain SFT of a causal LM with a pluggable loss strategy.

    Args:
        model: hub id, local directory, or the embedded alias `smollm2-135m-instruct`.
        loss: the loss strategy, a talr.losses class with its options: TALR, CrossEntropy, DFT, FLOW,
            or L2Anchor / KLToInitial around one of them (`base`). `--model.loss.help TALR` lists
            a strategy's options.
        learning_rate: peak AdamW learning rate (after linear warmup, then cosine decay to 0).
        warmup_ratio: share of optimizer steps spent warming up.
        max_new_tokens: generation budget when scoring validation/test answers.
        generate: score domain accuracy by greedy generation during validation and test.
        dtype: `auto` (float32 on CPU, bfloat16 on GPU), `float32`, `bfloat16`, `float16`.
        lora: peft LoRA adapters {r, alpha, dropout, target_modules}; only they train.
        anchor_device, anchor_dtype: where and how `l2` keeps theta_0 (`cpu` and/or `bfloat16`
            spare accelerator memory; the gradient term is computed in the parameters' dtype).
        max_bad_steps: stop after this many optimizer steps in a row with a non-finite loss or gradient.
        loss_chunk_size: project this many target tokens onto the vocabulary at a time, forward and
            backward, instead of all at once (same loss and gradients; far less memory for long
            targets and large vocabularies). Any strategy that does not need full logits.
        overwrite_results: let a new run replace the generation files an earlier run left in the
            same log directory (a run resumed from its checkpoint may always rewrite its own).
        fsdp_param_dtype: under FSDP2 (ModelParallelStrategy), compute in this dtype (`bfloat16`)
            while keeping float32 sharded weights and reducing gradients in float32; None: the
            weights' own dtype.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        loss: LossStrategy = TALR(),
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
        lora: dict[str, Any] | None = None,
        anchor_device: str = "same",
        anchor_dtype: str | None = None,
        max_bad_steps: int = 3,
        overwrite_results: bool = False,
        loss_chunk_size: int | None = None,
        fsdp_param_dtype: str | None = None,
    ) -> None:
        super().__init__()
        if not learning_rate > 0:
            raise ValueError(f"model.learning_rate must be positive, got {learning_rate}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if max_new_tokens < 1:
            raise ValueError(f"model.max_new_tokens must be at least 1, got {max_new_tokens}")
        if max_bad_steps < 1:
            raise ValueError(f"model.max_bad_steps must be at least 1, got {max_bad_steps}")
        if fsdp_param_dtype is not None:
            resolve_dtype(fsdp_param_dtype)  # fails before any model is loaded
        if anchor_device not in ("same", "cpu"):
            raise ValueError(f"model.anchor_device must be 'same' or 'cpu', got {anchor_device!r}")
        if not isinstance(loss, LossStrategy):
            raise TypeError(f"model.loss must be a loss strategy such as talr.losses.TALR(w_min=0.01), got {loss!r}")
        # Checkpoints are loaded with weights_only=True: the strategy goes in as plain data, not pickled.
        self.save_hyperparameters(ignore=["loss"])
        self.hparams["loss"] = loss.config()
        self.automatic_optimization = False
        self.loss_fn = loss
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(f"model.loss_chunk_size must be a positive number of tokens, got {loss_chunk_size}")
        if loss_chunk_size and self.loss_fn.needs.logits:
            raise ValueError(f"model.loss_chunk_size: loss {loss!r} needs full logits; unset the chunk size")
        self.net: TokenNLLModel | None = None
        self.tokenizer: Any = None
        # Kept out of the module tree (not in checkpoints or the optimizer): both are the initial
        # model, reloadable from `model`, so a resumed run rebuilds them exactly.
        self._reference: list[TokenNLLModel] = []  # KL's frozen initial model (none with LoRA)
        self._anchors: list[torch.Tensor] = []  # L2's theta_0, one per trainable parameter
        self.flow_weights: torch.Tensor | None = None  # FLOW's static weight of each training row
        self.bad_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self._bad_in_row = 0
        self.val_history: list[dict[str, float]] = []
        self._eval_records: list[tuple[int, Verdict, str]] = []
        self._eval_nll = [0.0, 0]  # summed NLL, target tokens
        self._results_checked = False

    # -- model ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":  # validate-before-fit, validate, test: check before their first write
            self.refuse_earlier_results()

    def refuse_earlier_results(self) -> None:
        """Stop a new run that would write over an earlier run's generation files (checked once)."""
        log_dir = self.trainer.log_dir  # a broadcast from rank 0: every rank must ask for it
        if self._results_checked or self.hparams.overwrite_results or resumes_its_own_run(self.trainer) or log_dir is None:
            return
        refuse_to_overwrite([Path(log_dir) / "generations"], "model.overwrite_results")
        self._results_checked = True

    def configure_model(self) -> None:
        if self.net is not None:
            return
        hp = self.hparams
        lm = load_model(hp.model, hp.dtype, hp.gradient_checkpointing, hp.trust_remote_code, hp.attn_implementation, hp.lora)
        if self.loss_fn.needs.reference and not is_peft(lm):
            reference = TokenNLLModel(copy.deepcopy(lm), hp.loss_chunk_size).eval().requires_grad_(False)
            self._reference = [reference]
        lm.train()  # from_pretrained returns eval mode; dropout-bearing models must train in train mode
        self.net = TokenNLLModel(lm, hp.loss_chunk_size)
        if self._device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
            # Before the anchors are copied, so that L2's theta_0 is sharded like the weights.
            dtype = resolve_dtype(hp.fsdp_param_dtype) if hp.fsdp_param_dtype else None
            shard_fsdp2(self.net, self._device_mesh["data_parallel"], dtype)
        if self.loss_fn.needs.anchor:
            device = "cpu" if hp.anchor_device == "cpu" else None
            dtype = resolve_dtype(hp.anchor_dtype) if hp.anchor_dtype else None
            self._anchors = [
                p.detach().to(device=device or p.device, dtype=dtype or p.dtype, copy=True)
                for p in self.net.parameters() if p.requires_grad
            ]
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
        total = self.total_optimizer_steps()
        warmup = math.ceil(self.hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, warmup=warmup, total=total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, for the schedule.

        Computed from the data rather than with `trainer.estimated_stepping_batches`, which builds
        the training iterator before a checkpoint's loop state is restored and so defeats the
        mid-epoch resume of the training loader.
        """
        trainer = self.trainer
        rows = len(trainer.datamodule.datasets["train"])
        per_epoch = math.ceil(math.ceil(rows / trainer.world_size) / trainer.datamodule.batch_size)
        limit = trainer.limit_train_batches
        if isinstance(limit, float):
            per_epoch = int(per_epoch * limit) if limit < 1.0 else per_epoch
        elif limit is not None:
            per_epoch = min(per_epoch, int(limit))
        total = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
        if trainer.max_steps and trainer.max_steps > 0:
            total = min(total, trainer.max_steps)
        if total == math.inf:
            raise ValueError("set trainer.max_epochs or trainer.max_steps: the learning-rate schedule needs a length")
        return max(1, int(total))

    # -- FLOW's pre-pass ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.refuse_earlier_results()  # trainer.ckpt_path is known from here on: a resumed run keeps its files
        if self.loss_fn.needs.sequence_weights and self.flow_weights is None:  # a resumed run has them
            self.flow_weights = self.sequence_weight_prepass()

    @torch.no_grad()
    def sequence_weight_prepass(self) -> torch.Tensor:
        """FLOW's static weights: one pass of the initial model over the training set.

        Each rank scores its shard and the results are gathered; the per-sequence losses are
        cached on disk keyed by the model and the exact token ids, so a rerun skips the pass.
        """
        datamodule = self.trainer.datamodule
        examples = datamodule.datasets["train"].examples
        digest = hashlib.sha256(f"{self.hparams.model}|{self.hparams.dtype}|{self.hparams.lora}".encode())
        for e in examples:
            digest.update(repr((e.input_ids, e.prompt_len)).encode())
        path = cache_dir() / "flow" / f"{digest.hexdigest()[:24]}.pt"
        if path.is_file():
            losses = torch.load(path, map_location="cpu", weights_only=True)
            rank_zero_info(f"[flow] sequence losses of the initial model loaded from {path}")
        else:
            losses = self._score_sequences(examples)
            if self.trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(losses, tmp)
                os.replace(tmp, path)
        strategy = self.loss_fn.token_strategy
        assert isinstance(strategy, FLOW)
        weights, tau = flow_weights(losses, strategy.tau)
        rank_zero_info(f"[flow] tau = {float(tau):.4f}, mean weight {float(weights.mean()):.4f} over {len(weights)} sequences")
        return weights

    def _score_sequences(self, examples: list) -> torch.Tensor:
        rank, world = self.global_rank, self.trainer.world_size
        mine = list(range(rank, len(examples), world))
        size = self.trainer.datamodule.eval_batch_size
        pad_id = self.tokenizer.pad_token_id
        scored: list[tuple[int, float]] = []
        with eval_mode(self):
            for start in tqdm(range(0, len(mine), size), desc="flow: initial-model losses", disable=rank != 0):
                chunk = mine[start:start + size]
                batch = {k: v.to(self.device) for k, v in pad_examples([examples[i] for i in chunk], pad_id).items()}
                nll, seq_index = self.net(batch["input_ids"], batch["attention_mask"], batch["labels"])
                rows = [examples[i].row_index for i in chunk]  # weights are looked up by row, not position
                scored += zip(rows, sequence_mean_losses(nll, seq_index, len(chunk)).tolist())
        scored = [pair for part in all_gather_objects(scored) for pair in part]
        losses = torch.full((len(self.trainer.datamodule.rows("train")),), float("nan"))  # NaN: dropped row
        for index, loss in scored:
            losses[index] = loss
        return losses

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

    @torch.no_grad()
    def reference_outputs(self, micro: dict[str, torch.Tensor], want_logits: bool) -> tuple[torch.Tensor, ...]:
        """The initial model's NLL (and logits) of a micro-batch's targets: LoRA with its adapters
        switched off, otherwise the frozen copy."""
        args = (micro["input_ids"], micro["attention_mask"], micro["labels"], want_logits)
        if is_peft(self.lm):
            with self.lm.disable_adapter():
                return self.net(*args)
        reference = self._reference[0]
        if next(reference.parameters()).device != self.device:
            reference.to(self.device)
        return reference(*args)

    def token_batch(self, micro: dict[str, torch.Tensor], step_losses: torch.Tensor | None) -> TokenBatch:
        """Forward one micro-batch and gather what the loss strategy asked for."""
        needs = self.loss_fn.needs
        outputs = self.net(micro["input_ids"], micro["attention_mask"], micro["labels"], needs.logits)
        batch = TokenBatch(outputs[0], outputs[1], micro["input_ids"].shape[0], step_seq_losses=step_losses)
        if needs.logits:
            batch.logits = outputs[2]
        if needs.reference:
            reference = self.reference_outputs(micro, needs.logits)
            batch.ref_nll = reference[0]
            batch.ref_logits = reference[2] if needs.logits else None
        if needs.sequence_weights:
            if self.flow_weights is None:
                raise RuntimeError("sequence weights were not computed before training")
            batch.seq_weights = self.flow_weights.to(self.device)[micro["row_index"]]
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        micro_batches = batch["micro_batches"]
        tokens = self.global_token_count(batch["num_target_tokens"])
        # Backends average gradients over ranks; multiply back so the step's loss is sum / all tokens.
        scale = self.trainer.world_size / tokens.clamp_min(1.0)
        step_losses = None
        if self.loss_fn.needs.step_losses and (len(micro_batches) > 1 or self.trainer.world_size > 1):
            step_losses = self.step_sequence_losses(micro_batches)
        weighted_sum = torch.zeros((), device=self.device)
        nll_sum = torch.zeros((), device=self.device)
        strategy_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        for micro in micro_batches:
            tokens_in = self.token_batch(micro, step_losses)
            out = self.loss_fn(tokens_in)
            self.manual_backward(out.total * scale)
            weighted_sum += out.total.detach()
            nll_sum += tokens_in.nll.detach().sum()
            for key, value in out.metrics.items():
                strategy_metrics[key].append(value)
        if self.loss_fn.needs.anchor:  # after the backend averaged the token-loss gradients
            params = [p for p in self.net.parameters() if p.requires_grad]
            for key, value in self.loss_fn.add_anchor_gradients(params, self._anchors).items():
                strategy_metrics[key].append(value)
        if not self.gradients_are_finite():
            optimizer.zero_grad(set_to_none=True)
            self.skip_bad_step(batch_idx, weighted_sum)
            return weighted_sum
        self._bad_in_row = 0
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
            self.log(f"train/{self.loss_fn.name}/{key}", torch.stack(values).float().mean())
        return loss

    def gradients_are_finite(self) -> bool:
        """One flag for all ranks: gradients are already averaged, so a NaN anywhere shows everywhere."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if not grads:
            return True
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # FSDP2: each rank holds a shard; the norm of the whole
            norm = norm.full_tensor()
        return bool(torch.isfinite(norm))

    def skip_bad_step(self, batch_idx: int, weighted_sum: torch.Tensor) -> None:
        """Skip an optimizer step whose loss or gradients are not finite; stop after too many in a row."""
        self.bad_steps += 1
        self._bad_in_row += 1
        self.log("train/skipped_steps", float(self.bad_steps))
        where = f"epoch {self.current_epoch}, batch {batch_idx} (optimizer step {self.global_step})"
        message = f"non-finite loss or gradient at {where}: loss sum {float(weighted_sum)}; step skipped"
        if self._bad_in_row >= self.hparams.max_bad_steps:
            raise FloatingPointError(
                f"{self._bad_in_row} optimizer steps in a row had a non-finite loss or gradient, the last at {where}; "
                f"stopping (model.max_bad_steps={self.hparams.max_bad_steps}). Lower the learning rate or check that batch."
            )
        rank_zero_warn(message)

    # -- validation and test ---------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any]) -> None:
        nll, _ = self.net(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self._eval_nll[0] += float(nll.sum())
        self._eval_nll[1] += int(nll.numel())
        if not self.hparams.generate:
            return
        # Through the net: under FSDP2 its root hooks gather the embeddings and head for generate().
        texts = generate_texts(self.net, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"], self.hparams.max_new_tokens)
        rows = self.trainer.datamodule.rows(self._split)
        task = self.trainer.datamodule.task_for(self._split)
        for index, text in zip(batch["row_index"].tolist(), texts):
            self._eval_records.append((index, task.score(text, rows[index]), text))

    def _gather(self) -> tuple[list[tuple[int, Verdict, str]], float, int]:
        gathered = all_gather_objects((self._eval_records, *self._eval_nll))
        # A distributed sampler pads with repeats: score each row once.
        records = list({r[0]: r for part in gathered for r in part[0]}.values())
        return records, sum(p[1] for p in gathered), sum(p[2] for p in gathered)

    def _eval_metrics(self, tag: str | None = None) -> dict[str, float]:
        """Metrics of the records collected since the last reset; resets them. `tag` names the
        generations file (default: the split and step)."""
        records, nll_sum, count = self._gather()
        metrics = {"loss": nll_sum / max(count, 1)}
        if records:
            records.sort(key=lambda r: r[0])
            rows = self.trainer.datamodule.rows(self._split)
            task = self.trainer.datamodule.task_for(self._split)
            verdicts, scored_rows = [r[1] for r in records], [rows[r[0]] for r in records]
            metrics.update(task.summarize(verdicts, scored_rows))
            # The task's figures (ESCI: confusion matrix) go to TensorBoard; drawn only when they can be logged.
            logger = self.trainer.logger
            if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero and not self.trainer.sanity_checking:
                for name, figure in task.figures(verdicts, scored_rows).items():
                    logger.experiment.add_figure(f"{'val' if self._split == 'val' else 'test'}/{name}", figure, self.global_step)
            self._write_generations(records, rows, tag or f"{self._split}_step{self.global_step:06d}")
        self._eval_records, self._eval_nll = [], [0.0, 0]
        return metrics

    def _eval_epoch_end(self) -> dict[str, float]:
        metrics = self._eval_metrics()
        prefix = "val" if self._split == "val" else "test"
        logged = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
        if self.trainer.state.fn == TrainerFn.FITTING:
            # Lightning puts a validation inside fit at the step count before the optimizer step that
            # triggered it; a logged "step" sets the x-axis, so val/* lines up with the callbacks'
            # numbers (forgetting, general benchmarks) and the checkpoint names, all at global_step.
            logged["step"] = float(self.global_step)
        self.log_dict(logged, sync_dist=False)
        return metrics

    @torch.no_grad()
    def evaluate(self, split: str = "val", tag: str | None = None) -> dict[str, float]:
        """Score the current weights on a split outside Lightning's loops (for callbacks such as
        model averaging): target NLL plus generation accuracy, as validation computes them."""
        self._split, self._eval_records, self._eval_nll = split, [], [0.0, 0]
        datamodule = self.trainer.datamodule
        loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
        with eval_mode(self):
            for batch in loader:
                self._eval_step(self.transfer_batch_to_device(batch, self.device, 0))
            return self._eval_metrics(tag)

    def _write_generations(self, records: list[tuple[int, Verdict, str]], rows: list[dict], tag: str) -> None:
        """Every scored generation as JSONL beside the logs: what the model said, not just the score."""
        log_dir = self.trainer.log_dir  # a broadcast from rank 0: every rank must ask for it
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or log_dir is None:
            return
        lines = [json.dumps({"row_index": index, "correct": verdict.correct, "parsed": verdict.parsed,
                             "answer": verdict.answer, "generation": text}) + "\n" for index, verdict, text in records]
        write_atomic(Path(log_dir) / "generations" / f"{tag}.jsonl", "".join(lines))

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
        if len(self.val_history) >= 2:
            first, after = self.val_history[0], self.val_history[1:]
            lines = [f"[talr] validation target NLL before fine-tuning {first['loss']:.4f}, "
                     f"after {after[-1]['loss']:.4f} (best {min(e['loss'] for e in after):.4f})"]
            if "accuracy" in first:
                best = max(after, key=lambda e: e["accuracy"])  # the earliest best, as ModelCheckpoint keeps it
                lines.append(
                    f"[talr] domain accuracy before fine-tuning {first['accuracy']:.3f} "
                    f"(unparsed {int(first['unparsed'])}/{int(first['count'])}); best after {best['accuracy']:.3f} "
                    f"at step {int(best['step'])}; last {after[-1]['accuracy']:.3f} "
                    f"(unparsed {int(after[-1]['unparsed'])}/{int(after[-1]['count'])})"
                )
            rank_zero_info("\n".join(lines))
        if self.trainer.logger is not None and self.trainer.log_dir:
            rank_zero_info(f"[talr] logs, checkpoints and generations: {self.trainer.log_dir} "
                           f"(tensorboard --logdir {self.trainer.log_dir})")

    def check_checkpoint_matches(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model before any weight is touched, naming both."""
        # A sharded checkpoint (FSDP2) has no "state_dict" here: the strategy loaded it already, strictly.
        if self.net is None or "state_dict" not in checkpoint:
            return
        mine = self.state_dict()
        theirs = checkpoint.get("state_dict", {})
        source = checkpoint.get("hyper_parameters", {}).get("model", "an unknown model")
        missing = sorted(set(mine) - set(theirs))
        shapes = [k for k in mine if k in theirs and tuple(theirs[k].shape) != tuple(mine[k].shape)]
        if missing or shapes:
            detail = (f"tensor {shapes[0]} has shape {tuple(theirs[shapes[0]].shape)} there, "
                      f"{tuple(mine[shapes[0]].shape)} here" if shapes else f"it lacks {missing[0]}")
            raise ValueError(
                f"the checkpoint was trained from {source!r} and does not fit model.model={self.hparams.model!r}: "
                f"{detail} ({len(missing)} missing, {len(shapes)} of another shape)"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["talr_val_history"] = self.val_history
        checkpoint["talr_bad_steps"] = self.bad_steps
        if self.flow_weights is not None:
            checkpoint["talr_flow_weights"] = self.flow_weights

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint_matches(checkpoint)
        self.val_history = list(checkpoint.get("talr_val_history", []))
        self.bad_steps = int(checkpoint.get("talr_bad_steps", 0))
        self.flow_weights = checkpoint.get("talr_flow_weights", self.flow_weights)


def shard_fsdp2(net: TokenNLLModel, mesh: Any, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: one parameter group per decoder layer, then the root (embeddings, final norm, head).

    Per-layer groups let each layer's weights be gathered just before it runs and freed after;
    gradient checkpointing set by `load_model` still applies (transformers checkpoints the layer's
    forward inside FSDP's hooks). `generate` is registered as a forward method of the root, so the
    root's weights are gathered for `lm.generate`, which bypasses `net.forward`.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    layer_names = set(getattr(net.lm, "_no_split_modules", None) or [])
    layers = [m for m in net.lm.modules() if type(m).__name__ in layer_names][::-1]  # innermost first
    if not layers:
        raise ValueError(f"FSDP2: {type(net.lm).__name__} names no decoder layer class (_no_split_modules)")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(net, "generate")


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` from every rank (a one-item list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


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
