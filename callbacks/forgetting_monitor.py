"""Forgetting monitor: how much less likely the model finds its own initial answers to general prompts.

Beyond the paper, and without external data: before fine-tuning, the initial model answers a
built-in set of general prompts (talr/general_prompts.py: math, code, instructions, facts,
writing). At every validation the current model scores those fixed answers; the rise of their
per-token NLL over the initial model's is a cheap, smooth signal of drift away from the initial
model's general behaviour, available long before benchmark accuracy moves.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from talr.data import Example
from talr.general_prompts import GENERAL_PROMPTS, GeneralPrompt, load_prompts, prompt_scores_file
from talr.generation import cut_at_stop, stop_token_ids
from talr.initial_cache import cache_key, is_fresh_single_process_run, load_cached, source_digest, store_cached
from talr.models import eval_mode
from talr.progress import track
from talr.replay import refuse_shared_prompts
from talr.results import GuardsResults, write_atomic
from talr.scoring import TokenScores, score_examples
from talr.token_loss import CALIBRATION_TEMPERATURES, IGNORE_INDEX

RESPONSES_FILE = "responses.jsonl"
PER_CATEGORY = ("nll_increase", "kl", "kl_calibrated", "agreement", "entropy")  # logged overall and per category
CURVE_FILE = "curve.json"


class ForgettingMonitor(GuardsResults):
    """Tracks the NLL drift of the initial model's answers to general prompts during fine-tuning.

    Before training, the initial model answers each prompt `samples_per_prompt` times (greedy when
    1, else sampled at temperature 1 with no top-k / top-p, seeded by `seed`, without touching the
    training RNG), up to `max_new_tokens` tokens including the end-of-turn token. The answers and
    their per-token NLLs under the initial model are kept in the callback's checkpoint state, so a
    resumed run compares against the same answers and never resamples.

    At the end of every validation during fit (sanity checks and `talr validate` excluded) the
    current model scores the same answers and the callback logs, with l0 / l the initial / current
    per-token NLL (l = -log p) of an answer token and means taken over all answer tokens:

    - `forgetting/nll_increase`: mean of (l - l0) = mean of (log p0 - log p), in nats per token.
      With sampled answers this is the plain Monte Carlo estimate of the per-token KL(p0 || p)
      along the initial model's own trajectories.
    - `forgetting/kl`: mean of the k3 estimator (r - 1) - log r with r = p / p0 (Schulman's
      estimator, as in talr.losses.KLToInitial). With sampled answers it estimates the same
      per-token KL(p0 || p) without bias, is never negative and has lower variance than the
      mean log-ratio. Under greedy decoding (samples_per_prompt 1) the answer tokens are p0's
      argmax, not samples, so neither number is a KL estimate: `kl` is then a divergence between
      p0 and p on p0's greedy tokens only (zero exactly when every such token keeps its initial
      probability), and `nll_increase` measures how much less likely p0's preferred answers became.
    - `forgetting/nll`: the current mean NLL of the answers.

    Both numbers above also move when the model only sharpens (or flattens) its distributions, as
    TALR's detached weights p^(1/tau) tend to do, with its most likely tokens unchanged. Three
    numbers separate that from drift:

    - `forgetting/agreement`: the share of answer tokens where the current model's most likely
      token is the initial model's (top-1 agreement on the initial model's own answers: its greedy
      answers when samples_per_prompt is 1); a temperature cannot move it.
    - `forgetting/kl_calibrated` at `forgetting/temperature`: the lowest `kl` of the current model
      over single temperatures T (talr.token_loss.CALIBRATION_TEMPERATURES, which include 1, so it
      never exceeds `kl`); what is left of the drift once a global temperature is allowed for. The
      divergence itself is minimised, not the answers' NLL: on greedy answers (p0's argmax tokens)
      the NLL always falls with T, and its minimum would sit at the grid's lowest temperature.
    - `forgetting/entropy`: the current model's mean entropy (nats) at the answer positions, so
      sharpening shows as its own number (it falls) rather than as forgetting.

    Each also per category: `forgetting/<name>/<category>`.

    Written (rank zero, atomically): `<dirpath>/responses.jsonl` (prompt, category, answer text and
    token ids, initial per-token NLL) once before training, `<dirpath>/curve.json` (every
    validation's numbers, step 0 included) after each validation, and beside it each prompt's sums
    behind those numbers (`prompt_sums`, `<dirpath>/prompt_scores/step<N>.jsonl`), with which
    `talr report` pairs two runs prompt by prompt. A fresh run refuses to
    overwrite these files from an earlier run unless `overwrite` is set; a resumed run continues
    them.

    Cost: generation once before training (55 prompts x samples_per_prompt answers of up to
    max_new_tokens tokens, batched by `batch_size`), then per validation one no-grad forward pass
    over the prompts plus answers: with the defaults 55 sequences of about 43 + 53 tokens, about
    5k tokens, which is roughly 0.4 of one quickstart optimizer step (a forward and backward pass
    over about 4k tokens). See docs/forgetting.md for measured times.

    Args:
        samples_per_prompt: answers per prompt; 1 is greedy decoding, more are sampled.
        max_new_tokens: longest answer, in tokens.
        seed: the sampling seed (unused by greedy decoding).
        prompts_file: replaces the built-in prompts: JSONL with `prompt` and optional `category`
            per line, or a text file with one prompt per line (see talr.general_prompts.load_prompts).
        batch_size: sequences per generation / scoring batch.
        dirpath: where the files go; default `<log_dir>/forgetting`.
        overwrite: let a fresh run replace another run's files in `dirpath`.
        prompts_per_category: keep only the first N prompts of each category (the built-in prompts
            have 11 in each of 5 categories): a quicker, coarser check; None keeps them all.
    """

    def __init__(
        self,
        samples_per_prompt: int = 1,
        max_new_tokens: int = 64,
        seed: int = 0,
        prompts_file: str | None = None,
        batch_size: int = 16,
        dirpath: str | None = None,
        overwrite: bool = False,
        prompts_per_category: int | None = None,
    ) -> None:
        if samples_per_prompt < 1:
            raise ValueError(f"ForgettingMonitor.samples_per_prompt must be at least 1, got {samples_per_prompt}")
        if max_new_tokens < 1:
            raise ValueError(f"ForgettingMonitor.max_new_tokens must be at least 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"ForgettingMonitor.batch_size must be at least 1, got {batch_size}")
        if prompts_per_category is not None and prompts_per_category < 1:
            raise ValueError(f"ForgettingMonitor.prompts_per_category must be at least 1, got {prompts_per_category}")
        prompts = load_prompts(prompts_file) if prompts_file else list(GENERAL_PROMPTS)
        self.prompts: list[GeneralPrompt] = first_per_category(prompts, prompts_per_category)
        self.prompts_per_category = prompts_per_category
        self.samples_per_prompt = samples_per_prompt
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.prompts_file = prompts_file
        self.batch_size = batch_size
        self.dirpath = dirpath
        self.overwrite = overwrite
        # one dict per answer: prompt_index, category, prompt, sample, prompt_ids, response_ids,
        # initial_nll and initial_argmax (per answer token)
        self.responses: list[dict[str, Any]] = []
        self.curve: list[dict[str, Any]] = []
        self.restored = False  # True once a checkpoint's state for this callback was loaded

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            samples_per_prompt=self.samples_per_prompt, max_new_tokens=self.max_new_tokens,
            seed=self.seed, prompts_file=self.prompts_file, prompts_per_category=self.prompts_per_category,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"responses": self.responses, "curve": self.curve}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.responses = list(state_dict["responses"])
        self.curve = list(state_dict["curve"])
        self.restored = True

    def output_dir(self, trainer: L.Trainer) -> Path:
        # trainer.log_dir broadcasts from rank 0: every rank must ask for it
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "forgetting"

    def result_paths(self, trainer: L.Trainer) -> list[Path]:
        out = self.output_dir(trainer)
        return [out / RESPONSES_FILE, out / CURVE_FILE]

    # -- hooks, in lifecycle order -------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Replay (data.replay) must not train on the answers this callback measures drift on.
        replay_prompts = getattr(trainer.datamodule, "replay_prompts", None)
        if callable(replay_prompts):
            refuse_shared_prompts(replay_prompts(), self.prompts)
        super().on_fit_start(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_start, not on_fit_start: some strategies restore callback state after on_fit_start,
        # and a resumed run must find its stored answers before deciding to sample.
        out = self.output_dir(trainer)
        if trainer.ckpt_path is not None and not self.restored:
            self.guard_results(trainer, always=True)  # the checkpoint is not of a run with this callback: its files are not ours
        if not self.responses:
            if trainer.global_step > 0:
                rank_zero_warn(
                    f"ForgettingMonitor: resuming at step {trainer.global_step} without this callback's state in the "
                    "checkpoint; the reference answers come from the checkpoint's weights, not the initial model"
                )
            # A fresh run in one process: the answers and their initial scores depend only on the initial
            # weights, the prompts and the settings, so an earlier run's are loaded from disk (talr.initial_cache).
            fresh = is_fresh_single_process_run(trainer)
            tokenizer = pl_module.tokenizer
            key = cache_key(pl_module.net, pl_module.device, "forgetting", [(p.category, p.text) for p in self.prompts],
                            tokenizer.chat_template, len(tokenizer), self.samples_per_prompt, self.max_new_tokens,
                            self.seed, self.batch_size, str(trainer.precision), source_digest(__file__)) if fresh else None
            cached = load_cached("forgetting", key) if key else None
            if cached is not None:
                self.responses, self.curve = cached["responses"], [cached["initial"]]
            else:
                # rank zero's answers for every rank: sampling need not agree bit for bit across devices
                self.responses = trainer.strategy.broadcast(self.sample_initial_responses(pl_module), src=0)
                initial = self.score_responses(pl_module)
                for response, scores in zip(self.responses, initial):
                    response["initial_nll"] = scores.nll.tolist()
                    response["initial_argmax"] = scores.argmax.tolist()
                self.curve = [self.curve_entry(trainer, prompt_sums(list(zip(self.responses, initial))))]
                if key:
                    store_cached("forgetting", key, {"responses": self.responses, "initial": self.curve[0]})
            self.log_entry(trainer, self.curve[-1])
        if trainer.is_global_zero:
            lines = "".join(json.dumps(r) + "\n" for r in self.responses)
            write_atomic(out / RESPONSES_FILE, lines)
            write_atomic(out / CURVE_FILE, json.dumps(self.curve, indent=1))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.output_dir(trainer)
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not self.responses:
            return  # `validate_before_fit` runs before the answers exist; step 0 is logged at train start
        sums = self.current_prompt_sums(pl_module)
        entry = self.curve_entry(trainer, sums)
        if self.curve and self.curve[-1]["step"] == entry["step"]:
            self.curve[-1] = entry  # a second validation at the same step replaces the first
        else:
            self.curve.append(entry)
        self.log_entry(trainer, entry)
        if trainer.is_global_zero:
            write_atomic(out / CURVE_FILE, json.dumps(self.curve, indent=1))
            write_prompt_sums(out, entry["step"], sums)
        rank_zero_info(f"[forgetting] step {entry['step']}: NLL increase {entry['nll_increase']:+.4f} nats/token, "
                       f"KL {entry['kl']:.4f} (at the best temperature {entry['temperature']:.3g}: "
                       f"{entry['kl_calibrated']:.4f}), top-1 agreement {entry['agreement']:.3f}, "
                       f"entropy {entry['entropy']:.3f} on {entry['tokens']} answer tokens")

    def summary_scores(self, best_step: int) -> dict[str, float]:
        """The drift before training, at the run's best step and at its last validation (NaN where
        not measured): what `RunSummary` puts in a sweep table."""
        by_step = {entry["step"]: entry for entry in self.curve}
        return {**summary_columns(by_step.get(0), "initial"), **summary_columns(by_step.get(best_step), "best"),
                **summary_columns(self.curve[-1] if self.curve else None, "last")}

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str | None = None) -> dict[str, Any]:
        """The drift of the module's live weights from the initial answers now, as a curve entry
        (`step`: the trainer's global step), without adding it to the curve or the logs: for callbacks
        that score other weights than training's (WiSE-FT's mixes). With `tag`, each prompt's sums go to
        `<dirpath>/prompt_scores/<tag>.jsonl`, so `talr report` can pair those weights prompt by prompt
        with a run's. Every rank calls it."""
        if not self.responses:
            raise ValueError("ForgettingMonitor.measure needs the initial model's answers, sampled at train start; "
                             "call it after training started")
        sums = self.current_prompt_sums(pl_module)
        if tag is not None:
            out = self.output_dir(trainer)  # on every rank: it broadcasts
            if trainer.is_global_zero:
                write_prompt_sums(out, tag, sums)
        return self.curve_entry(trainer, sums)

    # -- the initial answers ----------------------------------------------------------------------
    @torch.no_grad()
    def sample_initial_responses(self, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """The current (initial) model's answers: token ids up to and including the end-of-turn token."""
        tokenizer, lm = pl_module.tokenizer, pl_module.lm
        stops = stop_token_ids(tokenizer)
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False, add_generation_prompt=True)
            for p in self.prompts
        ]
        responses = []
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        # A private RNG stream: sampling here must not change the training run's random numbers.
        # Pure sampling from p0 (temperature 1, no top-k / top-p) keeps the KL estimate unbiased;
        # the model's own generation_config defaults are overridden either way.
        options = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if self.samples_per_prompt > 1 else {
            "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        with torch.random.fork_rng(devices=devices), eval_mode(lm):
            torch.manual_seed(self.seed)
            for start in track(range(0, len(texts), self.batch_size), "forgetting: initial answers",
                               enabled=getattr(pl_module, "global_rank", 0) == 0):  # a bare module: one process
                batch = tokenizer(texts[start:start + self.batch_size], add_special_tokens=False, padding=True,
                                  padding_side="left", return_tensors="pt").to(pl_module.device)
                generated = pl_module.net.generate(  # through the net: FSDP2 gathers its root weights there
                    **batch, max_new_tokens=self.max_new_tokens, num_return_sequences=self.samples_per_prompt,
                    eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, use_cache=True, **options,
                )
                width = batch["input_ids"].shape[1]
                for j, row in enumerate(generated[:, width:].tolist()):
                    in_batch = j // self.samples_per_prompt  # generate repeats each prompt K times in a row
                    prompt = self.prompts[start + in_batch]
                    answer = cut_at_stop(row, stops)
                    responses.append({
                        "prompt_index": start + in_batch,
                        "category": prompt.category,
                        "prompt": prompt.text,
                        "sample": j % self.samples_per_prompt,
                        "prompt_ids": batch["input_ids"][in_batch][batch["attention_mask"][in_batch].bool()].tolist(),
                        "response_ids": answer,
                        "response": tokenizer.decode(answer, skip_special_tokens=True),
                    })
        return responses

    def score_responses(self, pl_module: L.LightningModule) -> list[TokenScores]:
        """Each answer's tokens scored under the current weights (NLL, top-1 token, entropy, ...)."""
        examples = [
            Example(row_index=i, input_ids=r["prompt_ids"] + r["response_ids"], prompt_len=len(r["prompt_ids"]),
                    labels=[IGNORE_INDEX] * len(r["prompt_ids"]) + r["response_ids"])
            for i, r in enumerate(self.responses)
        ]
        return score_examples(pl_module.net, examples, pl_module.tokenizer.pad_token_id, self.batch_size,
                              pl_module.device, statistics=True)

    def current_prompt_sums(self, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Each prompt's drift sums (`prompt_sums`) under the current weights."""
        return prompt_sums(list(zip(self.responses, self.score_responses(pl_module))))

    # -- the curve --------------------------------------------------------------------------------
    def curve_entry(self, trainer: L.Trainer, sums: list[dict[str, Any]]) -> dict[str, Any]:
        """Token-weighted means over all answers and per category (see the class docstring), from the
        prompts' sums (`prompt_sums`)."""
        by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for prompt in sums:
            by_category[prompt["category"]].append(prompt)
        return {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch), **mean_drift(sums),
                "categories": {c: mean_drift(group) for c, group in sorted(by_category.items())}}

    def log_entry(self, trainer: L.Trainer, entry: dict[str, Any]) -> None:
        metrics = {f"forgetting/{k}": entry[k] for k in (*PER_CATEGORY, "nll", "temperature")}
        for category, values in entry["categories"].items():
            for key in PER_CATEGORY:
                metrics[f"forgetting/{key}/{category}"] = values[key]
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=entry["step"])


def summary_columns(entry: dict[str, Any] | None, when: str) -> dict[str, float]:
    """A curve entry's sweep-table columns `forgetting_<metric>_<when>` (NaN without an entry)."""
    return {f"forgetting_{key}_{when}": float(entry[key]) if entry else math.nan for key in PER_CATEGORY}


def k3_terms(initial_nll: torch.Tensor, current_nll: torch.Tensor) -> torch.Tensor:
    """Per token (r - 1) - log r, r = p / p0 (the k3 KL estimator's terms): [N] -> [N], [N, K] -> [N, K]."""
    log_ratio = initial_nll.view(-1, *[1] * (current_nll.dim() - 1)) - current_nll  # log p - log p0
    return torch.expm1(log_ratio) - log_ratio


def write_prompt_sums(dirpath: Path, step_or_tag: int | str, sums: list[dict[str, Any]]) -> None:
    """Each prompt's sums (`prompt_sums`), one JSON line each, where `talr report` pairs them
    (talr.general_prompts.prompt_scores_file)."""
    write_atomic(prompt_scores_file(dirpath, step_or_tag), "".join(json.dumps(p) + "\n" for p in sums))


def prompt_sums(pairs: list[tuple[dict[str, Any], TokenScores]]) -> list[dict[str, Any]]:
    """Per prompt (its answers together), sums over answer tokens: tokens, current NLL, NLL increase,
    k3 terms at temperature 1 and at each calibration temperature, top-1 agreements (None for answers
    stored by an older talr without `initial_argmax`) and entropy. The curve's means are these over
    their tokens (`mean_drift`), and they pair two runs prompt by prompt
    (talr.experiments.significance.drift_pair)."""
    by_prompt: dict[int, dict[str, Any]] = {}
    for response, scores in pairs:
        initial, current = torch.tensor(response["initial_nll"], dtype=torch.float64), scores.nll.double()
        entry = by_prompt.setdefault(response["prompt_index"], {
            "prompt_index": response["prompt_index"], "category": response["category"], "tokens": 0, "nll": 0.0,
            "nll_increase": 0.0, "kl": 0.0, "kl_at_temperature": torch.zeros(len(CALIBRATION_TEMPERATURES), dtype=torch.float64),
            "agreement": 0, "entropy": 0.0})
        entry["tokens"] += int(initial.numel())
        entry["nll"] += float(current.sum())
        entry["nll_increase"] += float((current - initial).sum())
        entry["kl"] += float(k3_terms(initial, current).sum())
        entry["kl_at_temperature"] += k3_terms(initial, scores.nll_at_temperature.double()).sum(0)
        if "initial_argmax" in response and entry["agreement"] is not None:
            entry["agreement"] += int((scores.argmax == torch.tensor(response["initial_argmax"])).sum())
        else:
            entry["agreement"] = None
        entry["entropy"] += float(scores.entropy.double().sum())
    return [{**e, "kl_at_temperature": e["kl_at_temperature"].tolist()} for _, e in sorted(by_prompt.items())]


def mean_drift(sums: list[dict[str, Any]]) -> dict[str, float]:
    """Means over all answer tokens of prompts' sums (`prompt_sums`): NLL increase, k3 KL estimate at
    temperature 1 and its lowest over the temperatures (with that temperature), top-1 agreement (NaN
    when an answer lacks its initial top-1 tokens), entropy."""
    tokens = sum(p["tokens"] for p in sums)
    total = {key: sum(p[key] for p in sums) for key in ("nll", "nll_increase", "kl", "entropy")}
    kl_at_temperature = torch.tensor([p["kl_at_temperature"] for p in sums], dtype=torch.float64).sum(0) / tokens
    best = int(kl_at_temperature.argmin())
    agreement = math.nan if any(p["agreement"] is None for p in sums) else sum(p["agreement"] for p in sums) / tokens
    return {"nll_increase": total["nll_increase"] / tokens, "kl": total["kl"] / tokens,
            "kl_calibrated": float(kl_at_temperature[best]), "temperature": CALIBRATION_TEMPERATURES[best],
            "agreement": agreement, "entropy": total["entropy"] / tokens, "nll": total["nll"] / tokens,
            "nll_initial": (total["nll"] - total["nll_increase"]) / tokens, "tokens": tokens}


def divergence(pairs: list[tuple[dict[str, Any], TokenScores]]) -> dict[str, float]:
    """Means over all answer tokens of (stored initial answer, its current scores) pairs (`mean_drift`)."""
    return mean_drift(prompt_sums(pairs))


def first_per_category(prompts: list[GeneralPrompt], limit: int | None) -> list[GeneralPrompt]:
    """The first `limit` prompts of each category, in their order (all of them when `limit` is None)."""
    if limit is None:
        return list(prompts)
    kept: dict[str, int] = {}
    chosen = []
    for prompt in prompts:
        if kept.get(prompt.category, 0) < limit:
            kept[prompt.category] = kept.get(prompt.category, 0) + 1
            chosen.append(prompt)
    return chosen
