"""Evaluation records of one pass over a validation or test split.

Each batch adds its rows' target tokens, scored through the one scoring path (`talr.scoring`), and,
when the task scores generations, each row's greedy answer and the task's verdict. `finish` gathers
every rank's numbers and returns the split's metrics:

- `loss`: mean target-token NLL. A global temperature moves it: a model that only sharpens its
  distributions (same ranking, lower entropy) loses or gains here without learning or forgetting.
- `calibrated_loss` at `temperature`: the mean NLL under softmax(logits / T) at the single T (on
  `talr.token_loss.CALIBRATION_TEMPERATURES`) that minimises it over the split; a temperature cannot move it.
- `token_accuracy`: teacher-forced top-1 accuracy of target tokens; a temperature cannot move it.
- `share_above_0.2`: the share of target tokens with p > 0.2, the paper's "easy" tokens (Section 4.3).
- the task's own metrics of the generations (accuracy, balanced accuracy, ...), which sharpening does not
  hurt either: the paper scores accuracy of greedy answers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from talr.generation import generate_texts
from talr.results import write_atomic
from talr.scoring import all_gather_objects, score_batch
from talr.tasks.base import Task, Verdict
from talr.token_loss import CALIBRATION_TEMPERATURES

EASY_PROBABILITY = 0.2  # the paper's threshold for an easy token (Section 4.3)


@dataclass
class EvalRecord:
    row_index: int  # the row of the split
    verdict: Verdict
    text: str  # what the model generated


class DomainEvaluation:
    """Accumulates one evaluation pass; `finish` returns its metrics and records and starts over."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.records: list[EvalRecord] = []
        # sums over target tokens: NLL, top-1 hits, easy tokens, NLL at each calibration temperature
        self.sums = torch.zeros(3 + len(CALIBRATION_TEMPERATURES), dtype=torch.float64)
        self.tokens = 0

    def add(self, net: nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor], task: Task, rows: list[dict],
            max_new_tokens: int | None) -> None:
        """Score one evaluation batch; `max_new_tokens` None: the loss only, no generation."""
        for scores in score_batch(net, batch, statistics=True):
            self.sums[0] += scores.nll.double().sum()
            self.sums[1] += scores.correct.sum()
            self.sums[2] += (scores.nll < -math.log(EASY_PROBABILITY)).sum()
            self.sums[3:] += scores.nll_at_temperature.double().sum(0)
            self.tokens += int(scores.nll.numel())
        if max_new_tokens is None:
            return
        # Through the net: under FSDP2 its root hooks gather the embeddings and head for generate().
        texts = generate_texts(net, tokenizer, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens)
        for index, text in zip(batch["row_index"].tolist(), texts):
            self.records.append(EvalRecord(index, task.score(text, rows[index]), text))

    def snapshot(self) -> dict[str, Any]:
        """What this pass computed so far, for a disk cache: the token sums and each row's generation."""
        return {"sums": self.sums.clone(), "tokens": self.tokens,
                "generations": [(r.row_index, r.text) for r in self.records]}

    def restore(self, snapshot: dict[str, Any], task: Task, rows: list[dict]) -> None:
        """Continue from a `snapshot`; its generations are scored again by `task` (cheap, and current)."""
        self.sums = snapshot["sums"].clone().double()
        self.tokens = int(snapshot["tokens"])
        self.records = [EvalRecord(index, task.score(text, rows[index]), text) for index, text in snapshot["generations"]]

    def finish(self, task: Task, rows: list[dict]) -> tuple[dict[str, float], list[EvalRecord]]:
        """Metrics over every rank's rows (each row once) and the records sorted by row; resets."""
        gathered = all_gather_objects((self.records, self.sums, self.tokens))
        # A distributed sampler pads with repeats: score each row once.
        records = sorted({r.row_index: r for part in gathered for r in part[0]}.values(), key=lambda r: r.row_index)
        tokens = max(sum(part[2] for part in gathered), 1)
        means = (sum(part[1] for part in gathered) / tokens).tolist()
        best = min(range(len(CALIBRATION_TEMPERATURES)), key=lambda k: means[3 + k])
        metrics = {"loss": means[0], "token_accuracy": means[1], f"share_above_{EASY_PROBABILITY:g}": means[2],
                   "calibrated_loss": means[3 + best], "temperature": CALIBRATION_TEMPERATURES[best]}
        if records:
            metrics.update(task.summarize([r.verdict for r in records], [rows[r.row_index] for r in records]))
        self.reset()
        return metrics, records


def publish_records(trainer: L.Trainer, split: str, task: Task, rows: list[dict], records: list[EvalRecord],
                    tag: str) -> None:
    """The task's figures (ESCI: a confusion matrix) to TensorBoard, and every scored generation as JSONL in
    `<log_dir>/generations/<tag>.jsonl`: what the model said, not just the score (rank zero, not in sanity checks)."""
    log_dir = trainer.log_dir  # a broadcast from rank 0: every rank must ask for it
    if not records or not trainer.is_global_zero or trainer.sanity_checking:
        return
    if isinstance(trainer.logger, TensorBoardLogger):
        verdicts, scored_rows = [r.verdict for r in records], [rows[r.row_index] for r in records]
        for name, figure in task.figures(verdicts, scored_rows).items():
            trainer.logger.experiment.add_figure(f"{split}/{name}", figure, trainer.global_step)
    if log_dir is not None:
        lines = [json.dumps({"row_index": r.row_index, "correct": r.verdict.correct, "parsed": r.verdict.parsed,
                             "answer": r.verdict.answer, "generation": r.text}) + "\n" for r in records]
        write_atomic(Path(log_dir) / "generations" / f"{tag}.jsonl", "".join(lines))


def describe_metrics(metrics: dict[str, float]) -> str:
    """One line for the log: accuracy with its counts where the task scores generations, and target NLL."""
    parts = []
    if "accuracy" in metrics:
        n = int(metrics["count"])
        parts.append(f"accuracy {metrics['accuracy']:.3f} ({round(metrics['accuracy'] * n)}/{n}, unparsed {int(metrics['unparsed'])})")
    parts.append(f"target NLL {metrics['loss']:.4f}")
    return ", ".join(parts)
