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
- `label_auc`, for a classification task (`Task.choices`): each row's log-probabilities of the classes'
  answer tokens at its first target position, scored by the macro one-vs-rest ROC AUC of the row-centred
  log-probabilities (`talr.stats.one_vs_rest_auc`). Neither a temperature nor a shift of the class prior
  moves it: a model that answers every row with one class (balanced accuracy at chance) can still rank
  the rows of each class above the others, and this measures how well.

Per row, the token sums behind the first four and the class log-probabilities (`RowScores`) are kept too and written beside the
generations (`publish_records`), so two runs that held out the same rows can be compared row by row
(talr.experiments.significance).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from talr.generation import generate_texts
from talr.results import write_atomic
from talr.scoring import all_gather_objects, score_batch, score_batch_with_cache
from talr.stats import one_vs_rest_auc
from talr.tasks.base import DataError, Task, Verdict
from talr.token_loss import CALIBRATION_TEMPERATURES

EASY_PROBABILITY = 0.2  # the paper's threshold for an easy token (Section 4.3)


@dataclass
class EvalRecord:
    row_index: int  # the row of the split
    verdict: Verdict
    text: str  # what the model generated


# one row's sums over its target tokens, in this order, then its NLL sum at each calibration temperature
ROW_SUMS = ("tokens", "nll", "top1_hits", "easy")


@dataclass
class RowScores:
    """One held-out row's target tokens summed: how many, their NLL, top-1 hits and easy tokens (p > 0.2),
    and their NLL at each of talr.token_loss.CALIBRATION_TEMPERATURES; for a classification task also
    its class (`choice`) and the log-probability of each class's answer token (`choice_logprobs`)."""

    row_index: int
    tokens: int
    nll: float
    top1_hits: int
    easy: int
    nll_at_temperature: list[float]
    choice: int | None = None
    choice_logprobs: list[float] | None = None

    @classmethod
    def from_sums(cls, row_index: int, sums: torch.Tensor) -> "RowScores":
        values = sums.tolist()
        return cls(row_index, round(values[0]), values[1], round(values[2]), round(values[3]), values[len(ROW_SUMS):])


class DomainEvaluation:
    """Accumulates one evaluation pass; `finish` returns its metrics and records and starts over."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.records: list[EvalRecord] = []
        self.row_sums: dict[int, torch.Tensor] = {}  # row index -> float64 [ROW_SUMS..., NLL at each temperature]
        self.row_choices: dict[int, torch.Tensor] = {}  # row index -> float64 log p of each class's token

    def add(self, net: nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor], task: Task, rows: list[dict],
            max_new_tokens: int | None) -> None:
        """Score one evaluation batch; `max_new_tokens` None: the loss only, no generation."""
        # with a generation to come, one pass over prompt + target serves both: its cache of the prompts is
        # where the generation starts (the prompts run once, not twice)
        cache = None
        choices = choice_token_ids(tokenizer, task)
        if max_new_tokens is None:
            scored = score_batch(net, batch, statistics=True, choices=choices)
        else:
            scored, cache = score_batch_with_cache(net, batch, choices=choices)
        for index, scores in zip(batch["row_index"].tolist(), scored):
            nll = scores.nll.double()
            head = torch.tensor([nll.numel(), nll.sum(), scores.correct.sum(), (nll < -math.log(EASY_PROBABILITY)).sum()],
                                dtype=torch.float64)
            self.row_sums[index] = torch.cat([head, scores.nll_at_temperature.double().sum(0)])
            if choices is not None:
                gold = int(choices[task.choice_index(rows[index])])
                if int(scores.targets[0]) != gold:
                    raise DataError(f"{task.name}: row {index}'s target starts with token {int(scores.targets[0])}, not "
                                    f"its class's choice token {gold}; the task's choices must be how targets begin")
                self.row_choices[index] = scores.choice_logprobs[0].double()
        if max_new_tokens is None:
            return
        # Through the net: under FSDP2 its root hooks gather the embeddings and head for generate().
        texts = generate_texts(net, tokenizer, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens, cache=cache)
        for index, text in zip(batch["row_index"].tolist(), texts):
            self.records.append(EvalRecord(index, task.score(text, rows[index]), text))

    def snapshot(self) -> dict[str, Any]:
        """What this pass computed so far, for a disk cache: each row's token sums and generation."""
        return {"row_sums": {i: v.clone() for i, v in self.row_sums.items()},
                "row_choices": {i: v.clone() for i, v in self.row_choices.items()},
                "generations": [(r.row_index, r.text) for r in self.records]}

    def restore(self, snapshot: dict[str, Any], task: Task, rows: list[dict]) -> None:
        """Continue from a `snapshot`; its generations are scored again by `task` (cheap, and current)."""
        self.row_sums = {int(i): v.clone().double() for i, v in snapshot["row_sums"].items()}
        self.row_choices = {int(i): v.clone().double() for i, v in snapshot.get("row_choices", {}).items()}
        self.records = [EvalRecord(index, task.score(text, rows[index]), text) for index, text in snapshot["generations"]]

    def finish(self, task: Task, rows: list[dict]) -> tuple[dict[str, float], list[EvalRecord], list[RowScores]]:
        """Metrics over every rank's rows (each row once), the generation records and the rows' token sums,
        both sorted by row; resets."""
        gathered = all_gather_objects((self.records, self.row_sums, self.row_choices))
        # A distributed sampler pads with repeats: score each row once.
        records = sorted({r.row_index: r for part in gathered for r in part[0]}.values(), key=lambda r: r.row_index)
        row_sums = {i: v for part in gathered for i, v in part[1].items()}
        row_choices = {i: v for part in gathered for i, v in part[2].items()}
        scored = [RowScores.from_sums(i, row_sums[i]) for i in sorted(row_sums)]
        for row in scored:
            if row.row_index in row_choices:
                row.choice = task.choice_index(rows[row.row_index])
                row.choice_logprobs = row_choices[row.row_index].tolist()
        totals = sum(row_sums.values(), torch.zeros(len(ROW_SUMS) + len(CALIBRATION_TEMPERATURES), dtype=torch.float64))
        means = (totals[1:] / totals[0].clamp_min(1)).tolist()  # NLL, top-1 hits, easy, NLL at each temperature
        best = min(range(len(CALIBRATION_TEMPERATURES)), key=lambda k: means[3 + k])
        metrics = {"loss": means[0], "token_accuracy": means[1], f"share_above_{EASY_PROBABILITY:g}": means[2],
                   "calibrated_loss": means[3 + best], "temperature": CALIBRATION_TEMPERATURES[best]}
        if records:
            metrics.update(task.summarize([r.verdict for r in records], [rows[r.row_index] for r in records]))
        with_choices = [r for r in scored if r.choice_logprobs is not None]
        if len({r.choice for r in with_choices}) > 1:  # a ranking needs rows of two classes
            scores, classes = np.array([r.choice_logprobs for r in with_choices]), np.array([r.choice for r in with_choices])
            metrics["label_auc"] = one_vs_rest_auc(scores, classes)
            # weighted by class support: a rare class (ESCI's Complement, 2% of rows) adds its noise in proportion
            metrics["label_auc_weighted"] = one_vs_rest_auc(scores, classes, average="weighted")
        self.reset()
        return metrics, records, scored


def publish_records(trainer: L.Trainer, split: str, task: Task, rows: list[dict], records: list[EvalRecord],
                    tag: str, row_scores: list[RowScores] = ()) -> None:
    """The task's figures (ESCI: a confusion matrix) to TensorBoard, every scored generation as JSONL in
    `<log_dir>/generations/<tag>.jsonl` (what the model said, not just the score), and each row's token
    sums as JSONL in `<log_dir>/row_scores/<tag>.jsonl` (`RowScores`' fields; rank zero, not in sanity checks)."""
    log_dir = trainer.log_dir  # a broadcast from rank 0: every rank must ask for it
    if not trainer.is_global_zero or trainer.sanity_checking:
        return
    if row_scores and log_dir is not None:
        lines = (json.dumps({k: v for k, v in asdict(r).items() if v is not None}) + "\n" for r in row_scores)
        write_atomic(Path(log_dir) / "row_scores" / f"{tag}.jsonl", "".join(lines))
    if not records:
        return
    if isinstance(trainer.logger, TensorBoardLogger):
        verdicts, scored_rows = [r.verdict for r in records], [rows[r.row_index] for r in records]
        for name, figure in task.figures(verdicts, scored_rows).items():
            trainer.logger.experiment.add_figure(f"{split}/{name}", figure, trainer.global_step)
    if log_dir is not None:
        lines = [json.dumps({"row_index": r.row_index, "correct": r.verdict.correct, "parsed": r.verdict.parsed,
                             "answer": r.verdict.answer, "generation": r.text}) + "\n" for r in records]
        write_atomic(Path(log_dir) / "generations" / f"{tag}.jsonl", "".join(lines))


def choice_token_ids(tokenizer: Any, task: Task) -> torch.Tensor | None:
    """The first token of each of the task's `choices` (None for a task without them); they must differ."""
    if task is None or task.choices is None:  # None: a bare scoring of token sums
        return None
    firsts = [tokenizer(text, add_special_tokens=False)["input_ids"][:1] for text in task.choices]
    ids = [first[0] if first else None for first in firsts]
    if None in ids or len(set(ids)) != len(ids):
        raise DataError(f"{task.name}: the choices {task.choices} do not start with distinct tokens ({ids}) under this "
                        "tokenizer, so one position cannot tell the classes apart")
    return torch.tensor(ids, dtype=torch.long)


def describe_metrics(metrics: dict[str, float]) -> str:
    """One line for the log: accuracy with its counts where the task scores generations, balanced accuracy
    and label AUC where the task has them, and target NLL."""
    parts = []
    if "accuracy" in metrics:
        n = int(metrics["count"])
        parts.append(f"accuracy {metrics['accuracy']:.3f} ({round(metrics['accuracy'] * n)}/{n}, unparsed {int(metrics['unparsed'])})")
    for key, name in (("balanced_accuracy", "balanced accuracy"), ("label_auc", "label AUC")):
        if key in metrics:
            parts.append(f"{name} {metrics[key]:.3f}")
    parts.append(f"target NLL {metrics['loss']:.4f}")
    return ", ".join(parts)
