"""SFTModule: a causal LM, a loss strategy, AdamW with warmup + cosine, validation by generation.

Optimization is manual so each optimizer step sees all of its micro-batches at once: the loss is
divided by the target-token count of the whole step (every micro-batch, every rank) before any
backward pass. Lightning's automatic accumulation divides each micro-batch's mean by the number
of micro-batches instead, which weighs tokens of short micro-batches more (transformers #34191).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from talr.allocator import release_free_memory
from talr.checkpoint_io import check_checkpoint_fits
from talr.evaluation import DomainEvaluation, describe_metrics, publish_records
from talr.flow_prepass import flow_sequence_weights
from talr.initial_cache import cache_key, load_cached, store_cached
from talr.losses import TALR, LossStrategy, TokenBatch, anchor_copies
from talr.memory_budget import (GIB, allocate_for_inference, allocate_for_training, apply_memory_budget, gib,
                                process_peak_memory)
from talr.nonfinite import NonFiniteSteps, gradient_norm
from talr.models import (TokenNLLModel, check_model_name, checkpointing_level, eval_mode, is_peft, load_model,
                         load_tokenizer, resolve_dtype, shard_fsdp2)
from talr.replay import check_replay_compatible
from talr.replay_prepass import initial_replay_answers
from talr.results import ResultGuard
from talr.schedule import adamw_warmup_cosine, schedule_length
from talr.token_loss import sequence_mean_losses


class SFTModule(L.LightningModule):
    """Domain SFT of a causal LM with a pluggable loss strategy.

    Args:
        model: hub id, local directory, or the embedded alias `smollm2-135m-instruct`.
        loss: the loss strategy, a talr.losses class with its options: TALR, CrossEntropy, DFT, FLOW,
            EAFT, SelectiveTokenMasking, Rho1, or L2Anchor / KLToInitial around one of them (`base`).
            `--model.loss.help TALR` lists a strategy's options.
        reference: the model whose token NLL (and logits) strategies with a reference compare
            against (KLToInitial, SelectiveTokenMasking, Rho1): hub id or local directory of a model
            with the same tokenizer. None: the initial model (with LoRA, the adapter-free model).
        learning_rate: peak AdamW learning rate (after linear warmup, then cosine decay to 0).
        warmup_ratio: share of optimizer steps spent warming up.
        max_new_tokens: generation budget when scoring validation/test answers.
        generate: score domain accuracy by greedy generation during validation and test.
        dtype: `auto` (float32 on CPU, bfloat16 on GPU), `float32`, `bfloat16`, `float16`.
        gradient_checkpointing: activation checkpointing per layer: false, `selective` (keeps the layers'
            widening matmuls, recomputes the rest) or true (`full`). With `data.micro_batch_size: auto`:
            false lets the budget choose off or full, `selective` adds selective between them, true is
            full always.
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
        gradient_checkpointing: bool | str = False,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        lora: dict[str, Any] | None = None,
        anchor_device: str = "same",
        anchor_dtype: str | None = None,
        max_bad_steps: int = 3,
        overwrite_results: bool = False,
        loss_chunk_size: int | None = None,
        fsdp_param_dtype: str | None = None,
        reference: str | None = None,
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
        checkpointing_level(gradient_checkpointing)  # a mistyped level fails before any model is loaded
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
        check_model_name(model)  # a mistyped directory fails here, before Lightning starts
        if reference is not None:
            if not self.loss_fn.needs.reference:
                raise ValueError(f"model.reference: loss {loss!r} uses no reference model; drop model.reference")
            check_model_name(reference)
        self.net: TokenNLLModel | None = None
        self.allocator_phases = False  # glibc's thresholds follow the phase under a CPU budget (on_fit_start)
        self.tokenizer: Any = None
        # Kept out of the module tree (not in checkpoints or the optimizer): both are the initial
        # model, reloadable from `model`, so a resumed run rebuilds them exactly.
        self._reference: list[TokenNLLModel] = []  # the frozen reference (none: LoRA's adapter-free model)
        self._anchors: list[torch.Tensor] = []  # L2's theta_0, one per trainable parameter
        self.flow_weights: torch.Tensor | None = None  # FLOW's static weight of each training row
        self.replay_answers: list[list[int]] | None = None  # data.replay's generated answers (kept in checkpoints)
        self.nonfinite = NonFiniteSteps(max_bad_steps)
        self._evaluation = DomainEvaluation()
        self._split = "val"
        self._generations_guard = ResultGuard("model.overwrite_results")
        self._initial_key: str | None = None  # set for a validation of the initial weights (cached on disk)
        self._from_cache = False

    # -- model ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if getattr(self.trainer.datamodule, "replay", None) is not None:
            check_replay_compatible(self.loss_fn)  # before validate-before-fit spends time
        if stage != "fit":  # validate-before-fit, validate, test: check before their first write
            self.refuse_earlier_results()

    def refuse_earlier_results(self) -> None:
        """Stop a new run that would write over an earlier run's generation files (checked once)."""
        if self.hparams.overwrite_results:
            return
        log_dir = self.trainer.log_dir  # a broadcast from rank 0: every rank must ask for it
        self._generations_guard.check(self.trainer, lambda: [Path(log_dir) / "generations"] if log_dir else [])

    def configure_model(self) -> None:
        if self.net is not None:
            return
        hp = self.hparams
        lm = load_model(hp.model, hp.dtype, hp.gradient_checkpointing, hp.trust_remote_code, hp.attn_implementation, hp.lora)
        if self.loss_fn.needs.reference and (hp.reference is not None or not is_peft(lm)):
            reference_lm = self.load_initial_lm() if hp.reference is None else load_model(
                hp.reference, hp.dtype, trust_remote_code=hp.trust_remote_code, attn_implementation=hp.attn_implementation)
            reference = TokenNLLModel(reference_lm, hp.loss_chunk_size).eval().requires_grad_(False)
            self._reference = [reference]
        lm.train()  # from_pretrained returns eval mode; dropout-bearing models must train in train mode
        self.net = TokenNLLModel(lm, hp.loss_chunk_size)
        if self._device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
            # Before the anchors are copied, so that L2's theta_0 is sharded like the weights.
            dtype = resolve_dtype(hp.fsdp_param_dtype) if hp.fsdp_param_dtype else None
            shard_fsdp2(self.net, self._device_mesh["data_parallel"], dtype)
        if self.loss_fn.needs.anchor:
            trainable = [p for p in self.net.parameters() if p.requires_grad]
            self._anchors = anchor_copies(trainable, "cpu" if hp.anchor_device == "cpu" else None,
                                          resolve_dtype(hp.anchor_dtype) if hp.anchor_dtype else None)
        self.tokenizer = load_tokenizer(hp.model, hp.trust_remote_code)

    @property
    def lm(self) -> torch.nn.Module:
        assert self.net is not None, "configure_model() has not run"
        return self.net.lm

    @property
    def bad_steps(self) -> int:
        """Optimizer steps skipped so far for a non-finite loss or gradient."""
        return self.nonfinite.skipped

    @property
    def lm_prefix(self) -> str:
        """Where the causal LM's weights sit in this module's state dict (for reading checkpoints)."""
        return "net.lm."

    def load_initial_lm(self) -> torch.nn.Module:
        """The initial model, freshly loaded as `model.model` names it (without adapters), on the CPU:
        the one way to get theta_0 (KL's reference, WiSE-FT, a resumed run's benchmark baseline)."""
        hp = self.hparams
        return load_model(hp.model, hp.dtype, trust_remote_code=hp.trust_remote_code,
                          attn_implementation=hp.attn_implementation)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_warmup_cosine([p for p in self.parameters() if p.requires_grad], hp.learning_rate, tuple(hp.betas),
                                   hp.weight_decay, hp.warmup_ratio, schedule_length(self.trainer))

    def on_fit_start(self) -> None:
        self.refuse_earlier_results()  # trainer.ckpt_path is known from here on: a resumed run keeps its files
        if self.loss_fn.needs.sequence_weights and self.flow_weights is None:  # a resumed run has them
            self.flow_weights = self.flow_sequence_weights()
        self.prepare_replay()
        # data.micro_batch_size auto: measured here, where the model is on its device and the loader not yet built
        choice = apply_memory_budget(self, self.trainer.datamodule)
        self.allocator_phases = choice is not None and self.device.type == "cpu"

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.allocator_phases:  # a CPU budget: the step allocates as its trial did (talr.memory_budget)
            allocate_for_training()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.allocator_phases:
            allocate_for_inference()

    def on_train_end(self) -> None:
        if self.allocator_phases:  # what the last validation freed is not kept beside the export (tcmalloc keeps it)
            release_free_memory()

    def flow_sequence_weights(self) -> torch.Tensor:
        """FLOW's static weight of every training row, from one pass of the initial model (cached)."""
        hp = self.hparams
        return flow_sequence_weights(self.net, self.trainer.datamodule, self.tokenizer.pad_token_id, self.device,
                                     f"{hp.model}|{hp.dtype}|{hp.lora}", self.trainer.is_global_zero,
                                     self.loss_fn.token_strategy.tau)

    def prepare_replay(self) -> None:
        """data.replay without a task: the initial model's answers to the replay prompts (cached on
        disk; a resumed run takes them from its checkpoint, since its weights are no longer initial)."""
        datamodule = self.trainer.datamodule
        replay = getattr(datamodule, "replay", None)
        if replay is None or not replay.generated:
            return
        prompt_ids = datamodule.replay_prompt_ids()
        if self.replay_answers is None:
            trainer = self.trainer
            self.replay_answers = initial_replay_answers(
                self.net, self.tokenizer, prompt_ids, replay.max_new_tokens, replay.generation_batch_size, self.device,
                str(trainer.precision), trainer.is_global_zero, lambda value: trainer.strategy.broadcast(value, src=0))
        datamodule.set_replay_answers(prompt_ids, self.replay_answers)

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
        """The reference model's NLL (and logits) of a micro-batch's targets: the frozen copy, or
        without `model.reference` under LoRA the model with its adapters switched off."""
        args = (micro["input_ids"], micro["attention_mask"], micro["labels"], want_logits)
        if not self._reference:
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

    def trial_step(self, micro: dict[str, torch.Tensor], in_a_larger_step: bool) -> None:
        """Forward, loss and backward of one micro-batch as `training_step` runs them (with TALR's
        step-loss pass when the step has more micro-batches), without an optimizer step: what
        `data.memory_budget` measures (talr.memory_budget). The gradients stay for the caller to
        measure and drop; the random state is restored, so the run trains as it would without it."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.trainer.precision_plugin.train_step_context():
            was_training = self.net.training
            self.net.train()
            try:
                step_losses = None
                if self.loss_fn.needs.step_losses and (in_a_larger_step or self.trainer.world_size > 1):
                    step_losses = self.step_sequence_losses([micro])
                self.loss_fn(self.token_batch(micro, step_losses)).total.backward()
            finally:
                self.net.train(was_training)

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
        by_source = SourceSums(self.device) if getattr(self.trainer.datamodule, "replay", None) is not None else None
        strategy_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        for micro in micro_batches:
            tokens_in = self.token_batch(micro, step_losses)
            out = self.loss_fn(tokens_in)
            self.manual_backward(out.total * scale)
            weighted_sum += out.total.detach()
            nll_sum += tokens_in.nll.detach().sum()
            if by_source is not None:
                by_source.add(micro["replay"].to(self.device)[tokens_in.seq_index], tokens_in.nll.detach(), out.token_losses)
            for key, value in out.metrics.items():
                strategy_metrics[key].append(value)
        if self.loss_fn.needs.anchor:  # after the backend averaged the token-loss gradients
            params = [p for p in self.net.parameters() if p.requires_grad]
            for key, value in self.loss_fn.add_anchor_gradients(params, self._anchors).items():
                strategy_metrics[key].append(value)
        grad_norm = gradient_norm(self.net.parameters())
        if grad_norm is not None and not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            self.nonfinite.skip(f"epoch {self.current_epoch}, batch {batch_idx} (optimizer step {self.global_step})",
                                float(weighted_sum))
            self.log("train/skipped_steps", float(self.nonfinite.skipped))
            return weighted_sum
        self.nonfinite.passed()
        if grad_norm is not None:
            self.log("train/grad_norm", grad_norm)  # before clipping: what goes wrong shows here first
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
        self.log("train/peak_memory_gib", process_peak_memory(self.device) / GIB)
        for key, values in strategy_metrics.items():
            self.log(f"train/{self.loss_fn.name}/{key}", torch.stack(values).float().mean())
        if by_source is not None:
            self.log_sources(by_source)
        return loss

    def log_sources(self, sums: SourceSums) -> None:
        """Replay's per-source logs: `train/loss/<source>` (the mean per-target-token loss of the
        source's tokens in the step: train/loss restricted to them), `train/nll/<source>`, and the
        step's target tokens of each source over all ranks (`train/target_tokens/<source>`)."""
        tokens = sums.tokens.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(tokens)
        for i, source in enumerate(SourceSums.SOURCES):
            local = sums.tokens[i].clamp_min(1.0)
            if sums.has_losses:
                self.log(f"train/loss/{source}", sums.loss[i] / local)
            self.log(f"train/nll/{source}", sums.nll[i] / local)
            self.log(f"train/target_tokens/{source}", tokens[i], reduce_fx="sum")
        if not sums.has_losses and not getattr(self, "_warned_token_losses", False):
            self._warned_token_losses = True
            rank_zero_warn(f"data.replay: loss {self.loss_fn!r} gives no per-token losses (LossOutput.token_losses), "
                           "so train/loss/domain and train/loss/replay are not logged; train/nll/<source> is")

    # -- validation and test ---------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any]) -> None:
        datamodule = self.trainer.datamodule
        max_new_tokens = self.hparams.max_new_tokens if self.hparams.generate else None
        self._evaluation.add(self.net, self.tokenizer, batch, datamodule.task_for(self._split),
                             datamodule.rows(self._split), max_new_tokens)

    def _finish_evaluation(self, tag: str | None = None) -> dict[str, float]:
        """Metrics of this pass over the split; its figures to TensorBoard, its generations to
        `<log_dir>/generations/<tag>.jsonl` and its rows' token sums to `<log_dir>/row_scores/<tag>.jsonl`
        (default tag: the split and step)."""
        datamodule = self.trainer.datamodule
        task, rows = datamodule.task_for(self._split), datamodule.rows(self._split)
        metrics, records, row_scores = self._evaluation.finish(task, rows)
        publish_records(self.trainer, self._split, task, rows, records, tag or f"{self._split}_step{self.global_step:06d}",
                        row_scores)
        return metrics

    def _log_evaluation(self) -> dict[str, float]:
        metrics = self._finish_evaluation()
        logged = {f"{self._split}/{k}": float(v) for k, v in metrics.items()}
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
        self._split = split
        self._evaluation.reset()
        datamodule = self.trainer.datamodule
        loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
        with eval_mode(self):
            for batch in loader:
                self._eval_step(self.transfer_batch_to_device(batch, self.device, 0))
            return self._finish_evaluation(tag)

    def initial_validation_key(self) -> str | None:
        """The cache key of a validation of the initial weights in one process (validate-before-fit, or
        `talr validate` without a checkpoint); None for every other validation. The weights, rows and
        settings in the key fix its numbers and generations (talr.initial_cache)."""
        trainer, hp = self.trainer, self.hparams
        if (trainer.state.fn != TrainerFn.VALIDATING or trainer.ckpt_path is not None or self.global_step
                or trainer.world_size > 1 or trainer.sanity_checking):
            return None
        datamodule = trainer.datamodule
        rows = [(e.row_index, e.input_ids, e.prompt_len) for e in datamodule.datasets["val"].examples]
        return cache_key(self.net, self.device, "validation", rows, datamodule.eval_batch_size, str(trainer.precision),
                         trainer.limit_val_batches, hp.max_new_tokens if hp.generate else None)

    def on_validation_epoch_start(self) -> None:
        self._split = "val"
        self._evaluation.reset()
        self._initial_key = self.initial_validation_key()
        cached = load_cached("validation", self._initial_key) if self._initial_key else None
        self._from_cache = cached is not None
        if cached is not None:
            datamodule = self.trainer.datamodule
            self._evaluation.restore(cached, datamodule.task_for("val"), datamodule.rows("val"))

    def on_test_epoch_start(self) -> None:
        self._split = "test"
        self._evaluation.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self._from_cache:  # a cached first validation has all its numbers already
            self._eval_step(batch)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        if self._initial_key and not self._from_cache:
            store_cached("validation", self._initial_key, self._evaluation.snapshot())
        metrics = self._log_evaluation()
        if not self.trainer.sanity_checking:
            rank_zero_info(f"[validation] step {self.global_step}: " + describe_metrics(metrics))

    def on_test_epoch_end(self) -> None:
        rank_zero_info("[test] " + describe_metrics(self._log_evaluation()))

    def on_fit_end(self) -> None:
        # Lightning closes the loggers before on_fit_end; callbacks' fit-end numbers (benchmarks,
        # WiSE-FT) reopened them. The module's hook runs after every callback's: flush once, here.
        for logger in self.trainer.loggers:
            logger.finalize("success")

    def teardown(self, stage: str) -> None:
        # After every callback's teardown (RunSummary's before / best / last lines): the fit's last
        # lines are its peak memory and where this run's results went (a new logger version each run).
        if stage != "fit" or self.trainer.interrupted:
            return
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None  # a broadcast: every rank asks
        what = f"allocated on {self.device}" if self.device.type == "cuda" else "the process's peak resident set"
        rank_zero_info(f"[talr] peak memory {gib(process_peak_memory(self.device))} ({what})")
        if log_dir:
            rank_zero_info(f"[talr] this run's logs, checkpoints, generations and export: {log_dir}\n"
                           f"[talr] plots: tensorboard --logdir {log_dir}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["talr_bad_steps"] = self.nonfinite.skipped
        if self.replay_answers is not None:
            checkpoint["talr_replay_answers"] = self.replay_answers
        if self.flow_weights is not None:
            checkpoint["talr_flow_weights"] = self.flow_weights

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A sharded checkpoint (FSDP2) has no "state_dict" here: the strategy loaded it already, strictly.
        if self.net is not None and "state_dict" in checkpoint:
            check_checkpoint_fits(self.state_dict(), checkpoint, self.hparams.model)
        self.nonfinite.skipped = int(checkpoint.get("talr_bad_steps", 0))
        self.flow_weights = checkpoint.get("talr_flow_weights", self.flow_weights)
        self.replay_answers = checkpoint.get("talr_replay_answers", self.replay_answers)


class SourceSums:
    """One optimizer step's target tokens, NLL and strategy loss summed per source (domain, replay)."""

    SOURCES = ("domain", "replay")

    def __init__(self, device: torch.device) -> None:
        self.tokens = torch.zeros(2, device=device)
        self.nll = torch.zeros(2, device=device)
        self.loss = torch.zeros(2, device=device)
        self.has_losses = True

    def add(self, is_replay: torch.Tensor, nll: torch.Tensor, token_losses: torch.Tensor | None) -> None:
        """A micro-batch's tokens: `is_replay`, `nll` and the strategy's `token_losses` per target token."""
        source = is_replay.long()
        self.tokens += torch.bincount(source, minlength=2).to(self.tokens.dtype)
        self.nll.index_add_(0, source, nll.to(self.nll.dtype))
        if token_losses is None:
            self.has_losses = False
        else:
            self.loss.index_add_(0, source, token_losses.to(self.loss.dtype))
