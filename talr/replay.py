"""Replay of general data: rows that are not of the domain, mixed into every training step at a set share.

The standing advice against forgetting in SFT tools (LLaMA-Factory's `mix_strategy` /
`interleave_probs`; its maintainers in LLaMA-Factory #2611) is to mix general data into the domain
data. talr needs no external data for it: by default the replay rows are the initial model's own
greedy answers to built-in general prompts (talr/replay_prompts.py), generated once before training
and cached (talr/replay_prepass.py); any dataset can replace them (`task`, for example
`talr.tasks.PromptResponse` over a JSONL/CSV of prompt/response pairs).

Mixing is exact, not sampled: every optimizer step holds `ratio x data.batch_size` replay rows and
the rest domain rows (the last step of an epoch, with fewer domain rows left, holds replay rows in
the same proportion, rounded). An epoch is one pass over the domain rows; replay rows are drawn in
a seeded order that cycles through all of them before repeating any. Replay rows count in the step's
target-token normaliser like any other row, never enter validation or scoring, and are logged
apart (`train/loss/replay`, `train/loss/domain`).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Iterator, Sequence

from torch.utils.data import Dataset, Sampler

from talr.general_prompts import GeneralPrompt, load_prompts
from talr.replay_prompts import REPLAY_PROMPTS
from talr.tasks.base import Task


class Replay:
    """General data replayed in every training step against forgetting (`data.replay`).

    Without `task`, the replay rows are the initial model's greedy answers to general prompts (the
    built-in replay set, or `prompts_file`), generated once at fit start and cached on disk.

    Args:
        ratio: share of each optimizer step's rows that are replay rows, in (0, 1);
            ratio x data.batch_size must be a whole number of rows (0.25 with batch 8: 2 replay rows
            and 6 domain rows a step).
        task: take the replay rows from this dataset instead of generated answers: any talr task,
            for example `talr.tasks.PromptResponse` over a JSONL/CSV of prompt/response pairs. All
            of its rows are used (none is held out for validation).
        prompts_file: generated answers: prompts replacing the built-in replay set, JSONL with
            `prompt` (and optional `category`) per line or plain text with one prompt per line.
            Must share no prompt with the ForgettingMonitor's, which measures drift on its own.
        max_new_tokens: generated answers: the longest answer in tokens (an answer cut there is
            trained without an end of turn, as the model would continue it).
        generation_batch_size: generated answers: prompts per generation batch (part of the cache key).
    """

    def __init__(
        self,
        ratio: float = 0.25,
        task: Task | None = None,
        prompts_file: str | None = None,
        max_new_tokens: int = 256,
        generation_batch_size: int = 16,
    ) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"data.replay.ratio is the share of each step's rows that are replay rows and must be "
                             f"in (0, 1), got {ratio}")
        if task is not None and prompts_file is not None:
            raise ValueError("data.replay: give either task (replay a dataset) or prompts_file (replay the initial "
                             "model's answers to these prompts), not both")
        if task is not None and not isinstance(task, Task):
            raise ValueError(f"data.replay.task must be a talr task such as talr.tasks.PromptResponse, got {task!r}")
        if max_new_tokens < 1:
            raise ValueError(f"data.replay.max_new_tokens must be at least 1, got {max_new_tokens}")
        if generation_batch_size < 1:
            raise ValueError(f"data.replay.generation_batch_size must be at least 1, got {generation_batch_size}")
        self.ratio = ratio
        self.task = task
        self.prompts_file = prompts_file
        self.max_new_tokens = max_new_tokens
        self.generation_batch_size = generation_batch_size
        # read now: a missing or empty prompt file fails before any model is loaded
        self.prompts: list[GeneralPrompt] = [] if task is not None else (
            load_prompts(prompts_file) if prompts_file else list(REPLAY_PROMPTS))

    @property
    def generated(self) -> bool:
        """Whether the replay rows are the initial model's answers (generated at fit start)."""
        return self.task is None

    def rows_per_step(self, batch_size: int) -> int:
        """Replay rows in a full step of `batch_size` rows; a ratio that gives no whole number is an error."""
        rows = self.ratio * batch_size
        if abs(rows - round(rows)) > 1e-6 or not 0 < round(rows) < batch_size:
            whole = sorted({n for n in (math.floor(rows), math.ceil(rows)) if 0 < n < batch_size})
            options = " or ".join(f"{n / batch_size:g} ({n} row{'s' if n > 1 else ''})" for n in whole)
            fix = f"use {options}" if options else "raise data.batch_size"
            raise ValueError(f"data.replay.ratio {self.ratio:g} x data.batch_size {batch_size} = {rows:g} replay rows "
                             f"per step; each step needs a whole number of replay and of domain rows: {fix}")
        return round(rows)

    def __repr__(self) -> str:
        source = f"task={self.task!r}" if self.task is not None else f"prompts_file={self.prompts_file!r}"
        return f"Replay(ratio={self.ratio}, {source})"


def replay_prompt_texts(replay: Replay, task_prompts: Sequence[str] = ()) -> set[str]:
    """The user prompts replay trains on: the generated source's prompts, or a task's (given)."""
    return {p.text.strip() for p in replay.prompts} | {t.strip() for t in task_prompts}


def refuse_shared_prompts(replay_prompts: set[str], monitored: Sequence[GeneralPrompt]) -> None:
    """Stop when replay trains on prompts the forgetting monitor measures drift on."""
    shared = sorted(replay_prompts & {p.text.strip() for p in monitored})
    if shared:
        raise ValueError(
            f"data.replay trains on {len(shared)} of the ForgettingMonitor's prompts (for example {shared[0]!r}): the "
            "monitor would then measure how well replay keeps its own answers, not forgetting; give replay other "
            "prompts (data.replay.prompts_file, or the built-in replay set) or the monitor another prompts_file")


def check_replay_compatible(loss: object) -> None:
    """Stop before training where replay cannot work with the loss strategy."""
    needs = getattr(loss, "needs", None)
    if needs is not None and needs.sequence_weights:
        raise ValueError(
            f"data.replay with model.loss {loss!r}: FLOW weights each training row by the initial model's loss from "
            "a pre-pass over the domain rows, with tau their median; replay rows have no such weight, and giving them "
            "one would move the median. Drop data.replay, or use another loss (CrossEntropy, TALR, L2Anchor, ...)")


class MixedDataset(Dataset):
    """The domain training examples, then the replay examples (index n_domain + j is replay row j)."""

    def __init__(self, domain: Sequence[object], replay: Sequence[object]) -> None:
        self.domain = domain
        self.replay = replay

    def __len__(self) -> int:
        return len(self.domain) + len(self.replay)

    def __getitem__(self, i: int) -> object:
        return self.domain[i] if i < len(self.domain) else self.replay[i - len(self.domain)]


class ReplayMixSampler(Sampler[int]):
    """Indices into a `MixedDataset`, laid out so that each batch of `batch_size` consecutive indices
    (each rank's batch under data parallelism) holds `replay_per_step` replay rows.

    An epoch is one pass over the domain rows in `domain_order(epoch)`'s order (length-grouped in
    the data module). A global step of `world_size` ranks takes world_size x (batch_size -
    replay_per_step) domain rows and world_size x replay_per_step replay rows. Lightning hands rank r
    the indices r, r + world_size, ... of this sampler (DistributedSamplerWrapper, no shuffle), so
    each step's block is laid out slot by slot: slot j of every rank is a replay row for j <
    replay_per_step. The last step of an epoch takes the domain rows left and replay rows in
    proportion, rounded (and up to a whole row per rank). Replay rows come from one seeded stream of permutations of all of them,
    continued from epoch to epoch. Deterministic in (seed, epoch): a resumed run sees the same steps.
    """

    def __init__(self, domain_order: Callable[[int], Sequence[int]], num_domain: int, num_replay: int, batch_size: int,
                 replay_per_step: int, seed: int, world_size: int = 1) -> None:
        if num_replay < 1:
            raise ValueError("data.replay has no usable replay rows")
        self.domain_order = domain_order
        self.num_domain = num_domain
        self.num_replay = num_replay
        self.batch_size = batch_size
        self.replay_per_step = replay_per_step
        self.seed = seed
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def domain_per_step(self) -> int:
        return self.world_size * (self.batch_size - self.replay_per_step)

    def steps(self) -> list[tuple[int, int]]:
        """(domain rows, replay rows) of every global step of an epoch, all ranks together."""
        full, left = divmod(self.num_domain, self.domain_per_step)
        plan = [(self.domain_per_step, self.world_size * self.replay_per_step)] * full
        if left:
            replay = round(left * self.replay_per_step / (self.batch_size - self.replay_per_step))
            # rounded up to a multiple of the ranks: Lightning's sampler would otherwise pad with repeats
            plan.append((left, replay + (-(left + replay)) % self.world_size))
        return plan

    def replay_stream(self, start: int, count: int) -> list[int]:
        """Replay rows start .. start + count of the endless stream of seeded permutations."""
        rows: list[int] = []
        cycle, offset = divmod(start, self.num_replay)
        while len(rows) < count:
            order = list(range(self.num_replay))
            random.Random(self.seed * 100_003 + 7_919 * (cycle + 1)).shuffle(order)
            rows += order[offset:]
            cycle, offset = cycle + 1, 0
        return rows[:count]

    def __len__(self) -> int:
        return sum(d + r for d, r in self.steps())

    def __iter__(self) -> Iterator[int]:
        plan = self.steps()
        per_epoch = sum(r for _, r in plan)
        replay = iter(self.replay_stream(self.epoch * per_epoch, per_epoch))
        domain = iter(self.domain_order(self.epoch))
        for num_domain, num_replay in plan:
            block = [self.num_domain + next(replay) for _ in range(num_replay)]
            block += [next(domain) for _ in range(num_domain)]
            yield from block
