"""Replay's pre-pass: the initial model's greedy answers to the replay prompts, cached on disk.

`data.replay` without a task trains on these answers (talr.replay). They depend only on the initial
weights, the prompts and the generation settings, so they are kept in talr's initial-model cache
(talr.initial_cache, kind `replay`): a rerun, or another strategy's run of the same model, loads them
instead of generating again. Under data parallelism every rank generates (a sharded model needs all
ranks in every forward) and rank zero's answers go to all, as the forgetting monitor does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from talr.data import Example, left_pad_prompts
from talr.generation import cut_at_stop, generate_token_ids, stop_token_ids
from talr.initial_cache import cache_key, load_cached, store_cached
from talr.progress import track
from talr.token_loss import IGNORE_INDEX


def _same_everywhere(value: Any) -> Any:
    return value


@torch.no_grad()
def generate_answers(net: nn.Module, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                     device: torch.device | str, progress: bool = True) -> list[list[int]]:
    """Each prompt's greedy answer: token ids up to and including the end of turn (or max_new_tokens)."""
    stops = stop_token_ids(tokenizer)
    prompts = [Example(row_index=i, input_ids=ids, labels=[IGNORE_INDEX] * len(ids), prompt_len=len(ids))
               for i, ids in enumerate(prompt_ids)]
    answers = []
    for start in track(range(0, len(prompts), batch_size), "replay: initial answers", enabled=progress):
        batch = {k: v.to(device) for k, v in left_pad_prompts(prompts[start:start + batch_size], tokenizer.pad_token_id).items()}
        new_tokens = generate_token_ids(net, tokenizer, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens)
        answers += [cut_at_stop(row, stops) for row in new_tokens.tolist()]
    return answers


def initial_replay_answers(net: nn.Module, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int,
                           batch_size: int, device: torch.device | str, precision: str, is_global_zero: bool = True,
                           broadcast: Callable[[Any], Any] = _same_everywhere) -> list[list[int]]:
    """The answers of `net` (the initial model) to the prompts, from the cache or generated and stored.

    Every rank calls it (the weights' fingerprint and a sharded model's generation are collective);
    `broadcast` sends rank zero's value to all (`trainer.strategy.broadcast`), and rank zero alone
    reads and writes the cache."""
    key = cache_key(net, torch.device(device), "replay", prompt_ids, max_new_tokens, batch_size, precision,
                    stop_token_ids(tokenizer), tokenizer.pad_token_id)
    cached = broadcast(load_cached("replay", key) if is_global_zero else None)
    if cached is not None:
        return [list(answer) for answer in cached["answers"]]
    answers = broadcast(generate_answers(net, tokenizer, prompt_ids, max_new_tokens, batch_size, device, is_global_zero))
    if is_global_zero:
        store_cached("replay", key, {"answers": answers})
    return answers
