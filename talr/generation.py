"""Batched generation from left-padded prompts: greedy for scoring, sampled for `talr cot`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from talr.models import eval_mode


def _cache_argument() -> str:
    """generate's name for a key/value cache: `cache` from transformers 5 (`past_key_values` is deprecated
    there), `past_key_values` before."""
    import transformers

    return "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus ChatML's <|im_end|> when it is a single token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(ids)


def cut_at_stop(token_ids: list[int], stops: list[int]) -> list[int]:
    """Generated ids up to and including the first end-of-turn token (the padding after it dropped)."""
    for i, token in enumerate(token_ids):
        if token in stops:
            return token_ids[: i + 1]
    return token_ids


@torch.no_grad()
def generate_token_ids(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float | None = None,
    top_p: float | None = None,
    cache: Any = None,
) -> torch.Tensor:
    """The new tokens after left-padded prompts, up to the end of the turn (padded after it).

    Greedy by default (scoring); with a `temperature`, sampled (with `top_p` nucleus sampling if set).
    The model's own generation_config defaults are overridden either way. `cache`: the prompts' key/value
    cache up to their last token (talr.scoring.score_batch_with_cache): only that token runs again.
    """
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature else {
        "do_sample": False, "temperature": None, "top_p": None}
    with eval_mode(model):
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            top_k=None,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **sampling,
            **({_cache_argument(): cache} if cache is not None else {}),
        )
    return out[:, prompt_ids.shape[1] :]


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float | None = None,
    top_p: float | None = None,
    cache: Any = None,
) -> list[str]:
    """Continuations of left-padded prompts up to the end of the turn, decoded without special tokens
    (`generate_token_ids`'s tokens)."""
    new_tokens = generate_token_ids(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, cache)
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
