"""Per-token NLL of examples under the current weights: no grad, length-batched, gathered across ranks.

The one scoring path of the project: validation, the FLOW pre-pass, ForgettingMonitor and
TokenProbabilityLogger all score examples through `score_batch` / `score_examples`, so a fix or a
new per-token statistic lands everywhere at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from talr.data import Example, pad_examples
from talr.models import eval_mode
from talr.progress import track
from talr.token_loss import IGNORE_INDEX


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` from every rank (a one-item list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_by_sequence(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> list[torch.Tensor]:
    """Per-token values (row-major over the batch) as one tensor per sequence."""
    counts = torch.bincount(seq_index, minlength=num_seqs).tolist()
    return list(torch.split(values, counts))


@dataclass
class TokenScores:
    """One example's target tokens under the current weights (float32 / int64, on the CPU). Beyond the
    NLL, the statistics that a global temperature cannot move (top-1 token) or that show it (entropy,
    NLL at each calibration temperature) are there when asked for with `statistics=True`."""

    nll: torch.Tensor  # [n]
    targets: torch.Tensor | None = None  # [n] the target tokens
    argmax: torch.Tensor | None = None  # [n] the model's most likely token
    entropy: torch.Tensor | None = None  # [n] nats
    nll_at_temperature: torch.Tensor | None = None  # [n, K] over talr.token_loss.CALIBRATION_TEMPERATURES
    choice_logprobs: torch.Tensor | None = None  # [n, C] log p of each choice token (`choices` given)

    @property
    def correct(self) -> torch.Tensor:
        """Teacher-forced top-1 accuracy per token: the most likely token is the target."""
        assert self.argmax is not None and self.targets is not None, "scored without statistics"
        return self.argmax == self.targets


@torch.no_grad()
def score_batch(net: nn.Module, batch: dict[str, torch.Tensor], statistics: bool = False,
                choices: torch.Tensor | None = None) -> list[TokenScores]:
    """Each row's target tokens scored, for a right-padded batch already on the device; `choices`
    (token ids, with `statistics`): each target position's log-probability of each.

    `net` is a `talr.models.TokenNLLModel`: only target positions reach the vocabulary projection.
    """
    rows = batch["input_ids"].shape[0]
    if not statistics:
        nll, seq_index = net(batch["input_ids"], batch["attention_mask"], batch["labels"])[:2]
        return [TokenScores(part) for part in split_by_sequence(nll.float().cpu(), seq_index.cpu(), rows)]
    return _scores_by_row(net.token_statistics(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                               choices=choices), rows)


def _scores_by_row(stats: dict[str, torch.Tensor], rows: int) -> list[TokenScores]:
    """`TokenNLLModel.token_statistics`' per-token tensors split into each row's `TokenScores`."""
    seq_index = stats.pop("seq_index").cpu()
    split = {k: split_by_sequence(v.cpu(), seq_index, rows) for k, v in stats.items()}
    return [TokenScores(**{k: v[i] for k, v in split.items()}) for i in range(rows)]


def prompt_aligned(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows of an evaluation batch with their prompts left-padded to one width P (as generation
    takes them) and their targets after, right-padded: a key/value cache of this layout's first P - 1
    positions is the prompts' own, so generation can start from it (`score_batch_with_cache`)."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    lengths = batch["attention_mask"].sum(-1)
    prompt_lengths = prompt_mask.sum(-1)
    target_lengths = lengths - prompt_lengths
    longest = int(target_lengths.max())
    span = torch.arange(longest, device=prompt_ids.device)
    # each row's target tokens sit at [prompt_len, length) of the right-padded row
    source = (prompt_lengths[:, None] + span).clamp(max=batch["input_ids"].shape[1] - 1)
    real = span < target_lengths[:, None]
    targets = torch.where(real, batch["input_ids"].gather(1, source), batch["input_ids"].new_zeros(()))
    labels = torch.where(real, batch["labels"].gather(1, source), batch["labels"].new_full((), IGNORE_INDEX))
    return {"input_ids": torch.cat([prompt_ids, targets], 1),
            "attention_mask": torch.cat([prompt_mask, real.to(prompt_mask.dtype)], 1),
            "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), labels], 1)}


@torch.no_grad()
def score_batch_with_cache(net: nn.Module, batch: dict[str, torch.Tensor],
                           choices: torch.Tensor | None = None) -> tuple[list[TokenScores], Any]:
    """`score_batch(..., statistics=True, choices=choices)` on the prompt-aligned layout, and the
    key/value cache of the prompts' first P - 1 positions (P the padded prompt width), for a generation
    that continues the prompts without running them again."""
    aligned = prompt_aligned(batch)
    stats = net.token_statistics(aligned["input_ids"], aligned["attention_mask"], aligned["labels"], keep_cache=True,
                                 choices=choices)
    cache = stats.pop("cache")
    cache.crop(-(cache.get_seq_length() - (batch["prompt_ids"].shape[1] - 1)))  # negative: tokens to remove
    return _scores_by_row(stats, aligned["input_ids"].shape[0]), cache


@torch.no_grad()
def score_examples(
    net: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int,
    device: torch.device | str,
    *,
    shard: bool = False,
    desc: str | None = None,
    statistics: bool = False,
) -> list[TokenScores]:
    """Every example's target tokens scored (see `TokenScores`), in the order given.

    Examples are batched by length (longest first), so little compute goes to padding. With `shard`,
    each rank scores an equal share (the last ranks repeat an example rather than run fewer batches:
    a sharded model needs every rank in every forward) and every rank gets all results; without it,
    every rank scores everything (the same numbers on every rank).
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    rank, world = _rank_and_world()
    if shard and world > 1 and order:
        per_rank = -(-len(order) // world)
        padded = order + order[: per_rank * world - len(order)]
        mine = padded[rank::world]
    else:
        mine = order
    results: dict[int, TokenScores] = {}
    with eval_mode(net):
        starts = range(0, len(mine), batch_size)
        for start in track(starts, desc or "scoring", enabled=desc is not None and rank == 0):
            indices = mine[start:start + batch_size]
            batch = {k: v.to(device) for k, v in pad_examples([examples[i] for i in indices], pad_id).items()}
            results.update(zip(indices, score_batch(net, batch, statistics)))
    if shard and world > 1:
        for part in all_gather_objects(results):
            results.update(part)
    return [results[i] for i in range(len(examples))]
