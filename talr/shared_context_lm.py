"""lm-eval's Hugging Face model, with each distinct context run once for all of its continuations.

Multiple-choice benchmarks (ARC, HellaSwag, PIQA, MMLU) ask for log P(continuation | context) of
every answer option after the same context. lm-eval's `HFLM` runs context + option once per option,
so a 4-option HellaSwag item costs four passes over its context. `SharedContextHFLM` runs the context
once, keeps its key/value cache, and scores all options from it in one batch: the same numbers up to
float rounding (tests/test_shared_context_lm.py checks each request against HFLM), with the context's
tokens computed once instead of once per option.

Only the positions whose next token is scored meet the vocabulary (a 49k-token projection costs a
quarter of a 135M model's forward at every position HFLM projects). Requests that lm-eval would
truncate (context + continuation longer than the model's window), contexts whose options are longer
than they are (`_worth_sharing`) and encoder-decoder models go through HFLM's own path unchanged.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]


class SharedContextHFLM(HFLM):
    """`HFLM` whose loglikelihood requests are grouped by context (see the module docstring)."""

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        through_hflm = []  # requests lm-eval would truncate, and contexts not worth sharing
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("SharedContextHFLM: a loglikelihood request needs a context and a continuation")
            if len(context) + len(continuation) > self.max_length + 1:
                through_hflm.append(index)  # lm-eval cuts these from the left: its own path
            else:
                by_context[tuple(context)].append(index)
        for context in [c for c, members in by_context.items() if not self._worth_sharing(c, members, requests)]:
            through_hflm.extend(by_context.pop(context))  # HFLM's path is as fast for these (below)
        if through_hflm:
            answers = super()._loglikelihood_tokens([requests[i] for i in through_hflm], disable_tqdm=True,
                                                    override_bs=override_bs)
            for index, answer in zip(through_hflm, answers, strict=True):
                results[index] = answer
        progress = tqdm(total=len(requests) - len(through_hflm), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests (shared contexts)")
        # contexts of similar length together, as many as the batch size per pass
        contexts = sorted(by_context, key=len, reverse=True)
        per_pass = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 16
        for start in range(0, len(contexts), per_pass):
            chunk = contexts[start: start + per_pass]
            options = [[requests[i][2] for i in by_context[context]] for context in chunk]
            answers = self._score_continuations([list(c) for c in chunk], options)
            for context, scored in zip(chunk, answers, strict=True):
                for index, answer in zip(by_context[context], scored, strict=True):
                    results[index] = answer
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
                progress.update(len(scored))
        progress.close()
        return results  # type: ignore[return-value]

    @staticmethod
    def _worth_sharing(context: tuple[int, ...], members: list[int], requests: list[Request]) -> bool:
        """A context is run once for all its options where that saves tokens: two options or more, and the
        context at least as long as the longest option. Where options are longer than their context
        (PIQA: about 14 context and 23 option tokens) the saving is small and the padded second pass
        and the copied key/value cache cost more (measured: half HFLM's speed), so HFLM scores them."""
        return len(members) >= 2 and len(context) >= max(len(requests[i][2]) for i in members)

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of the given hidden states only (the model's own head and final softcap)."""
        logits = self.model.get_output_embeddings()(hidden)
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits[..., : self.vocab_size]

    @torch.no_grad()
    def _score_continuations(self, contexts: list[list[int]],
                             options: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """Per context, per option: (sum of the option's token log-probabilities, every token the argmax).

        One pass over the contexts, right-padded (causal attention never lets a real token see the
        padding after it), keeps their key/value cache; one more pass runs every option but its last
        token from its context's cache, at the positions that follow its context."""
        device = self.device
        lengths = torch.tensor([len(c) for c in contexts], device=device)
        width = int(lengths.max())
        context_ids = torch.zeros((len(contexts), width), dtype=torch.long, device=device)
        for row, context in enumerate(contexts):
            context_ids[row, : len(context)] = torch.tensor(context, device=device)
        context_mask = (torch.arange(width, device=device) < lengths[:, None]).long()
        # the decoder alone: only each context's last position (its options' first token) meets the vocabulary
        decoder = self.model.get_decoder()
        first = decoder(context_ids, attention_mask=context_mask, use_cache=True)
        last = self._project(first.last_hidden_state[torch.arange(len(contexts), device=device), lengths - 1])
        first_logprobs = F.log_softmax(last, dim=-1, dtype=self.softmax_dtype)
        owner = torch.tensor([row for row, opts in enumerate(options) for _ in opts], device=device)
        flat = [option for opts in options for option in opts]
        longest = max(len(option) for option in flat)
        rest_logprobs = None
        if longest > 1:
            inputs = torch.zeros((len(flat), longest - 1), dtype=torch.long, device=device)
            option_mask = torch.zeros((len(flat), longest - 1), dtype=torch.long, device=device)
            for row, option in enumerate(flat):
                inputs[row, : len(option) - 1] = torch.tensor(option[:-1], device=device)
                option_mask[row, : len(option) - 1] = 1
            mask = torch.cat([context_mask[owner], option_mask], dim=1)
            positions = lengths[owner, None] + torch.arange(longest - 1, device=device)
            # transformers 5 names the key/value cache `cache`, earlier versions `past_key_values`
            name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
            cache = getattr(first, name)
            cache.batch_select_indices(owner)  # each option's row gets its context's keys and values
            rest = decoder(inputs, attention_mask=mask, position_ids=positions, use_cache=False, **{name: cache})
            # the real positions only, option after option (padding never meets the vocabulary)
            hidden = rest.last_hidden_state[option_mask.bool()]
            rest_logprobs = F.log_softmax(self._project(hidden), dim=-1, dtype=self.softmax_dtype)
        answers: list[list[tuple[float, bool]]] = [[] for _ in contexts]
        offset = 0
        for row, option in enumerate(flat):
            logprobs = first_logprobs[owner[row]].unsqueeze(0)
            if len(option) > 1:
                logprobs = torch.cat([logprobs, rest_logprobs[offset: offset + len(option) - 1]])
                offset += len(option) - 1
            tokens = torch.tensor(option, device=device)
            total = float(logprobs.gather(1, tokens.unsqueeze(1)).sum())
            answers[int(owner[row])].append((total, bool((logprobs.argmax(dim=-1) == tokens).all())))
        return answers
