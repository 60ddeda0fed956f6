"""SFTDataModule: task rows -> chat-formatted token ids with a target-only label mask.

Training batches are whole optimizer steps: `batch_size` sequences, sorted by length and cut into
micro-batches of `micro_batch_size`, so the module can count the step's target tokens before the
first backward pass (exact gradient accumulation) and pad each micro-batch only to its own length.
`micro_batch_size: auto` leaves the size to the module, which measures the largest that fits
`memory_budget` before training (talr.memory_budget).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from talr.memory_budget import parse_budget
from talr.models import load_tokenizer
from talr.progress import track
from talr.replay import MixedDataset, Replay, ReplayMixSampler
from talr.tasks.base import DataError, Row, Task
from talr.token_loss import IGNORE_INDEX

log = logging.getLogger(__name__)

Overlength = Literal["truncate", "drop", "error"]


@dataclass
class Example:
    row_index: int  # index into the split's rows, for scoring generations
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt positions
    prompt_len: int
    truncated: bool = False
    replay: bool = False  # a replay row (data.replay): trained on, logged apart, never validated


    @property
    def num_targets(self) -> int:
        return len(self.input_ids) - self.prompt_len


def turn_end_text(tokenizer: Any) -> str:
    """What the chat template writes after an assistant message (ChatML: '<|im_end|>').

    Found by rendering a marker message, so any template works; trailing whitespace is left out
    of the target because the next turn's opening owns it.
    """
    marker = "TALR_MARKER_7f3a"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    end = rendered[rendered.rindex(marker) + len(marker) :].rstrip()
    return end or (tokenizer.eos_token or "")


def prompt_text(tokenizer: Any, task: Task, row: Row) -> str:
    """Chat-template prompt with the generation prompt and the task's assistant prefix."""
    text = tokenizer.apply_chat_template(task.prompt_messages(row), tokenize=False, add_generation_prompt=True)
    return text + task.assistant_prefix(row)


def encode_example(
    tokenizer: Any, task: Task, row: Row, row_index: int, max_length: int, overlength: Overlength, end_text: str,
    where: str | None = None,
) -> Example | None:
    """Token ids and labels for one row; None when `overlength` drops it or nothing fits.

    `where` names the row in errors (default: its index)."""
    where = where or f"{task.name}: row {row_index}"
    prompt_ids = tokenizer(prompt_text(tokenizer, task, row), add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(task.target(row) + end_text, add_special_tokens=False)["input_ids"]
    return example_from_ids(prompt_ids, target_ids, row_index, max_length, overlength, where)


def example_from_ids(
    prompt_ids: list[int], target_ids: list[int], row_index: int, max_length: int, overlength: Overlength, where: str,
) -> Example | None:
    """An example of token ids, with `overlength` applied (None: dropped, or no target token fits)."""
    if not target_ids:
        raise DataError(f"{where} has an empty target")
    truncated = False
    if len(prompt_ids) + len(target_ids) > max_length:
        room = max_length - len(prompt_ids)
        if overlength == "error":
            raise DataError(
                f"{where} is {len(prompt_ids) + len(target_ids)} tokens (prompt {len(prompt_ids)}, target "
                f"{len(target_ids)}), longer than data.max_length={max_length}; raise max_length, or set "
                "data.overlength to 'truncate' or 'drop'"
            )
        if overlength == "drop" or room < 1:
            return None
        target_ids, truncated = target_ids[:room], True
    return Example(
        row_index=row_index,
        input_ids=prompt_ids + target_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + target_ids,
        prompt_len=len(prompt_ids),
        truncated=truncated,
    )


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example], rows: list[Row]) -> None:
        self.examples = examples
        self.rows = rows  # all rows of the split; examples point into it

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which each run of `group_size` has similar lengths (less padding).

    Shuffle, cut into mega-batches of 16 groups, sort each by length, then shuffle the groups.
    Deterministic in (seed, epoch), so a resumed run sees the same order.
    """

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int, shuffle: bool = True) -> None:
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 100_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        mega = self.group_size * 16
        groups = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: self.lengths[i], reverse=True)
            groups += [chunk[j : j + self.group_size] for j in range(0, len(chunk), self.group_size)]
        if self.shuffle:
            rng.shuffle(groups)
        return iter(i for group in groups for i in group)


def pad_examples(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def left_pad_prompts(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation."""
    width = max(e.prompt_len for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, width - e.prompt_len :] = torch.tensor(e.input_ids[: e.prompt_len])
        mask[i, width - e.prompt_len :] = 1
    return {"prompt_ids": ids, "prompt_mask": mask}


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint mid-epoch.

    Its state is the epoch and the number of batches the training loop has processed in it;
    after a restore, the sampler is set to that epoch and the next iteration skips those batches,
    so a resumed run sees exactly the batches an uninterrupted one would (the sampler's order
    depends only on seed and epoch).
    """

    def __init__(self, *args: Any, progress: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A callable giving the training loop's {epoch, batches_done}. An init argument, so that
        # Lightning keeps it when it re-creates the loader with a distributed sampler.
        self.progress = progress or (lambda: {"epoch": 0, "batches_done": 0})
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.progress().items()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches_done", 0))
        # Lightning sets the epoch only when it starts an epoch, after a resume's iterator exists.
        for sampler in (self.sampler, getattr(self.sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(int(state.get("epoch", 0)))

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):  # collating a skipped batch is cheap next to a training step
            next(iterator, None)
        return iterator


class StepCollator:
    """One optimizer step's sequences -> length-sorted micro-batches plus the step's token count."""

    def __init__(self, pad_id: int, micro_batch_size: int) -> None:
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        ordered = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
        micro = []
        for i in range(0, len(ordered), self.micro_batch_size):
            part = ordered[i : i + self.micro_batch_size]
            micro.append({**pad_examples(part, self.pad_id), "row_index": torch.tensor([e.row_index for e in part]),
                          "replay": torch.tensor([e.replay for e in part])})
        return {"micro_batches": micro, "num_target_tokens": sum(e.num_targets for e in examples)}


class EvalCollator:
    """Loss inputs (right-padded) and generation prompts (left-padded) of the same rows."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        batch = pad_examples(examples, self.pad_id)
        batch.update(left_pad_prompts(examples, self.pad_id))
        batch["row_index"] = torch.tensor([e.row_index for e in examples])
        return batch


class SFTDataModule(L.LightningDataModule):
    """Rows from a Task, split by seed into train and validation, encoded with the chat template.

    Args:
        task: the domain (data source, prompt, target, scorer).
        tokenizer: model name or path whose tokenizer and chat template to use (linked from the model).
        test_task: optional separate task for `talr test` (for example a held-out file).
        max_length: longest sequence in tokens; see `overlength`.
        overlength: 'truncate' cuts the target's tail, 'drop' removes the row (both counted and
            reported), 'error' stops before training naming the first such row.
        val_size: rows held out for validation (an int) or a fraction of the rows (a float < 1).
        split_by: a row field whose rows stay together on one side of the split (ESCI's `query`: no
            query of the validation rows is seen in training); whole groups are drawn by seed until
            they hold at least `val_size` rows. None: rows are split one by one.
        batch_size: sequences per optimizer step on each device.
        replay: general data mixed into every training step against forgetting (`talr.replay.Replay`):
            `{ratio: 0.25}` makes a quarter of each step's rows the initial model's own answers to
            built-in general prompts (generated once, cached); `task` replays a dataset instead.
            Replay rows never enter validation.
        micro_batch_size: sequences per forward pass; batch_size must be a multiple of it. `auto`: the
            largest that fits `memory_budget` (any size up to batch_size: the last micro-batch of a step
            may be smaller), measured with trial steps before training; activation checkpointing is
            turned on where even 1 does not fit without it (talr.memory_budget). Results are the same
            at any size.
        memory_budget: the memory a training step may use with `micro_batch_size: auto`: an amount
            (`4GiB`, `3.5GB`, `2048MiB`) or a share of the free memory (`50%`); the process's peak
            resident set on a CPU, allocated device memory on a GPU. A fixed micro_batch_size (a
            config's auto overridden on the command line) wins; the log then says the budget was not applied.
        seed: the split and the batch order.
    """

    def __init__(
        self,
        task: Task,
        tokenizer: str = "smollm2-135m-instruct",
        test_task: Task | None = None,
        max_length: int = 1024,
        overlength: Overlength = "truncate",
        val_size: int | float = 0.1,
        split_by: str | None = None,
        batch_size: int = 8,
        micro_batch_size: int | Literal["auto"] = 4,
        memory_budget: str | None = None,
        eval_batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        group_by_length: bool = True,
        replay: Replay | None = None,
    ) -> None:
        super().__init__()
        if overlength not in ("truncate", "drop", "error"):
            raise ValueError(f"data.overlength must be 'truncate', 'drop' or 'error', got {overlength!r}")
        if max_length < 2:
            raise ValueError(f"data.max_length must be at least 2, got {max_length}")
        if micro_batch_size == "auto":
            if memory_budget is None:
                raise ValueError("data.micro_batch_size: auto needs data.memory_budget (for example 4GiB, or 50% "
                                 "of the free memory)")
            if batch_size < 1:
                raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if memory_budget is not None:
            parse_budget(memory_budget)  # a malformed budget fails here, before any model is loaded
        elif batch_size < 1 or micro_batch_size < 1 or batch_size % micro_batch_size:
            raise ValueError(
                f"data.batch_size ({batch_size}) must be a positive multiple of data.micro_batch_size ({micro_batch_size})"
            )
        if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
            raise ValueError(f"data.val_size as a fraction must be in (0, 1), got {val_size}")
        if replay is not None:
            replay.rows_per_step(batch_size)  # a ratio that gives no whole number of rows fails here
        self.replay = replay
        self.task = task
        self.test_task = test_task
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.overlength: Overlength = overlength
        self.val_size = val_size
        self.split_by = split_by
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.memory_budget = memory_budget
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.group_by_length = group_by_length
        self.tokenizer: Any = None
        self.datasets: dict[str, ExampleDataset] = {}
        self.stats: dict[str, int] = {}
        self.source_rows: dict[str, list[int]] = {}

    def split_rows(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        n_val = int(round(len(rows) * self.val_size)) if isinstance(self.val_size, float) else int(self.val_size)
        if not 0 < n_val < len(rows):
            raise DataError(f"{self.task.name}: val_size={self.val_size} leaves no train or no validation rows of {len(rows)}")
        groups = self.split_groups(rows)
        random.Random(self.seed).shuffle(groups)
        val: list[int] = []
        taken = 0  # whole groups from the front of the shuffled order (single rows: the first n_val)
        while len(val) < n_val:
            val += groups[taken]
            taken += 1
        groups = groups[taken:]
        if not groups:
            raise DataError(f"{self.task.name}: val_size={self.val_size} takes every {self.split_by!r} group of "
                            f"{len(rows)} rows; nothing is left to train on")
        val = sorted(val)
        train = sorted(i for group in groups for i in group)
        self.source_rows.update(train=train, val=val)  # to name a row of the source in errors
        return [rows[i] for i in train], [rows[i] for i in val]

    def split_groups(self, rows: list[Row]) -> list[list[int]]:
        """Row indices grouped by the `split_by` field (one row a group without it), in first-seen order."""
        if self.split_by is None:
            return [[i] for i in range(len(rows))]
        groups: dict[Any, list[int]] = {}
        for i, row in enumerate(rows):
            if self.split_by not in row:
                raise DataError(f"{self.task.name}: data.split_by={self.split_by!r}, but row {i + 1} has no such field "
                                f"(it has {', '.join(sorted(row))})")
            groups.setdefault(row[self.split_by], []).append(i)
        return list(groups.values())

    def encode(self, task: Task, rows: list[Row], split: str) -> ExampleDataset:
        end_text = turn_end_text(self.tokenizer)
        examples, dropped, truncated = [], 0, 0
        for i, row in enumerate(track(rows, f"tokenizing {task.name}/{split}", unit="row")):
            source = self.source_rows[split][i] if split in self.source_rows else i
            where = f"{task.name}/{split}: row {source + 1} of the source"
            ex = encode_example(self.tokenizer, task, row, i, self.max_length, self.overlength, end_text, where)
            if ex is None:
                dropped += 1
                continue
            truncated += ex.truncated
            examples.append(ex)
        self.stats.update({f"{split}/rows": len(rows), f"{split}/dropped": dropped, f"{split}/truncated": truncated})
        if dropped or truncated:
            log.warning(
                "%s/%s: %d of %d rows longer than max_length=%d: %d truncated (target tail cut), %d dropped",
                task.name, split, dropped + truncated, len(rows), self.max_length, truncated, dropped,
            )
        if not examples:
            raise DataError(
                f"{task.name}/{split}: zero usable rows of {len(rows)} (all longer than max_length={self.max_length} "
                f"with overlength={self.overlength!r})"
            )
        return ExampleDataset(examples, rows)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        if stage in (None, "fit", "validate") and "train" not in self.datasets:
            train_rows, val_rows = self.split_rows(self.task.read())
            self.datasets["train"] = self.encode(self.task, train_rows, "train")
            self.datasets["val"] = self.encode(self.task, val_rows, "val")
            if self.replay is not None and self.replay.task is not None:
                self.set_replay_examples(self.encode(self.replay.task, self.replay.task.read(), "replay"))
        if stage in (None, "test") and "test" not in self.datasets:
            if self.test_task is None:
                raise DataError("`talr test` needs data.test_task (a task reading the held-out rows)")
            self.datasets["test"] = self.encode(self.test_task, self.test_task.read(), "test")

    def rows(self, split: str) -> list[Row]:
        return self.datasets[split].rows

    def task_for(self, split: str) -> Task:
        return self.test_task if split == "test" and self.test_task is not None else self.task

    # -- replay (data.replay) ----------------------------------------------------------------------
    def set_replay_examples(self, data: ExampleDataset) -> None:
        """The replay rows: a task's (at setup) or the initial model's answers (at fit start)."""
        for example in data.examples:
            example.replay = True
        self.datasets["replay"] = data

    def replay_prompt_ids(self) -> list[list[int]]:
        """The generated replay source's prompts in the chat template, ready for generation."""
        assert self.replay is not None and self.tokenizer is not None
        return [self.tokenizer(self.tokenizer.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                                                  add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"] for p in self.replay.prompts]

    def set_replay_answers(self, prompt_ids: list[list[int]], answers: list[list[int]]) -> None:
        """The generated replay rows: each prompt with the initial model's answer as the target."""
        assert self.replay is not None
        examples, rows = [], []
        for i, (prompt, answer, source) in enumerate(zip(prompt_ids, answers, self.replay.prompts)):
            where = f"replay: answer to prompt {i + 1} ({source.text[:40]!r})"
            example = example_from_ids(prompt, answer, len(examples), self.max_length, self.overlength, where)
            if example is not None:
                examples.append(example)
                rows.append({"prompt": source.text, "category": source.category})
        if len(examples) < len(answers):
            log.warning("replay: %d of %d prompts with their answers longer than max_length=%d left out (overlength=%r)",
                        len(answers) - len(examples), len(answers), self.max_length, self.overlength)
        if not examples:
            raise DataError(f"replay: no prompt with its answer fits data.max_length={self.max_length}")
        self.set_replay_examples(ExampleDataset(examples, rows))

    def replay_prompts(self) -> set[str]:
        """The user prompts the replay rows train on (empty without replay)."""
        if self.replay is None:
            return set()
        if self.replay.task is None:
            return {p.text.strip() for p in self.replay.prompts}
        task = self.replay.task
        return {next((m["content"] for m in reversed(task.prompt_messages(row)) if m["role"] == "user"), "").strip()
                for row in self.rows("replay")} - {""}

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Optimizer steps in one pass over the domain training rows (each rank's batches)."""
        rows = len(self.datasets["train"])
        if self.replay is None:
            return math.ceil(math.ceil(rows / world_size) / self.batch_size)
        domain_per_step = world_size * (self.batch_size - self.replay.rows_per_step(self.batch_size))
        return math.ceil(rows / domain_per_step)

    def training_examples(self) -> list[Example]:
        """Every row a training step may hold: the domain's and the replay rows."""
        return self.datasets["train"].examples + (self.datasets["replay"].examples if "replay" in self.datasets else [])

    def longest_micro_batch(self, size: int) -> dict[str, torch.Tensor]:
        """The first micro-batch of `size` rows that StepCollator makes of a step holding the longest
        training rows (replay rows included): the most memory any micro-batch of that size can take."""
        longest = sorted(self.training_examples(), key=lambda e: len(e.input_ids), reverse=True)
        return StepCollator(self.tokenizer.pad_token_id, size)(longest[:size])["micro_batches"][0]

    def train_dataloader(self) -> DataLoader:
        if self.micro_batch_size == "auto":
            raise RuntimeError("data.micro_batch_size is still 'auto': SFTModule sets it at fit start "
                               "(talr.memory_budget.apply_memory_budget); with another module, call that first")
        data = self.datasets["train"]
        sampler = LengthGroupedSampler(
            [len(e.input_ids) for e in data.examples], self.batch_size, self.seed, shuffle=True
        ) if self.group_by_length else None
        if self.replay is not None:
            data, sampler = self.mixed_training_data()
        return ResumableDataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=sampler is None,
            collate_fn=StepCollator(self.tokenizer.pad_token_id, self.micro_batch_size),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if sampler is None else None,
            progress=self._progress if self.trainer is not None else None,
        )

    def mixed_training_data(self) -> tuple[MixedDataset, ReplayMixSampler]:
        """The domain and replay rows with the sampler that mixes them at data.replay.ratio."""
        if "replay" not in self.datasets:
            raise RuntimeError("data.replay: the replay rows do not exist yet; SFTModule generates them at fit start "
                               "(with another module, call set_replay_answers first)")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        replay_per_step = self.replay.rows_per_step(self.batch_size)
        domain = self.datasets["train"].examples
        lengths = [len(e.input_ids) for e in domain]
        group = world_size * (self.batch_size - replay_per_step) if self.group_by_length else 1

        def domain_order(epoch: int) -> list[int]:
            order = LengthGroupedSampler(lengths, group, self.seed, shuffle=True)
            order.set_epoch(epoch)
            return list(order)

        sampler = ReplayMixSampler(domain_order, len(domain), len(self.datasets["replay"]), self.batch_size,
                                   replay_per_step, self.seed, world_size)
        return MixedDataset(domain, self.datasets["replay"].examples), sampler

    def _progress(self) -> dict[str, int]:
        # `processed` also counts the batch in flight when a checkpoint is written from its end hooks
        return {"epoch": self.trainer.current_epoch,
                "batches_done": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def _eval_loader(self, split: str) -> DataLoader:
        data = self.datasets[split]
        # Longest first: the slowest generation batch shows up at once, and padding stays low.
        order = sorted(range(len(data)), key=lambda i: -len(data.examples[i].input_ids))
        return DataLoader(
            torch.utils.data.Subset(data, order),
            batch_size=self.eval_batch_size,
            collate_fn=EvalCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
