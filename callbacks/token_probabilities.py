"""Token probabilities on a fixed probe set of training rows as fine-tuning proceeds (the paper's Figure 3).

Every logging event scores the probe rows with the current weights and records, for each target
token, its probability p = exp(-NLL) and the TALR weight it would get. From these the callback logs
the distribution of p (histogram and quantiles), the share of "easy" tokens (p above a threshold,
0.2 in the paper: its curriculum curve), and the TALR weights (histogram, mean, share at the w_min
floor), and writes every token's record to `<dirpath>/step_XXXXXX.parquet` for
`notebooks/token_probabilities.ipynb`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from talr.data import Example
from talr.losses import TALR, TokenBatch
from talr.results import GuardsResults, write_atomic
from talr.scoring import score_examples
from talr.token_loss import shift_targets

QUANTILES = (10, 25, 50, 75, 90)


def talr_strategy(pl_module: L.LightningModule, talr: TALR | None) -> TALR:
    """The TALR strategy whose weights to report: `talr` if given, else the run's own TALR
    (also when it is wrapped by l2 / kl), else TALR's defaults."""
    if talr is not None:
        return talr
    strategy = getattr(pl_module, "loss_fn", None)
    strategy = strategy.token_strategy if strategy is not None else None
    return strategy if isinstance(strategy, TALR) else TALR()


class TokenProbabilityLogger(GuardsResults):
    """Logs each target token's probability on a fixed probe subset of the training data.

    When: at the start of training (step 0), then every `every_n_steps` optimizer steps, or at the
    end of every training epoch when `every_n_steps` is None. Each event is one no-grad forward
    pass in eval mode over the probe rows (`num_examples` rows, in batches of the data module's
    `eval_batch_size`); the model's mode is restored afterwards.

    Logged (every logger gets the scalars; TensorBoard also the histograms), all under `token_probs/`:
    histograms `probability` and `talr_weight`; scalars `p10` `p25` `p50` `p75` `p90` and `mean` of
    the probabilities, `share_above_<threshold>` (share of tokens with p > threshold),
    `talr_weight_mean`, `talr_cutoff_share` (share of tokens at the w_min floor) and `talr_tau`.

    TALR weights are computed by the TALR strategy itself (talr.losses.TALR) as if the probe rows
    were one batch: tau is the median over the probe rows of each row's mean token loss (or the
    strategy's fixed tau), w = max(exp(-NLL / tau), w_min). The strategy is `talr` when given, else
    the run's own TALR (alone or inside l2 / kl), else TALR with its defaults.

    Written: `<dirpath>/step_XXXXXX.parquet`, one row per target token: row_index (the training
    row), position (index of the token in the row's input ids), token_id, token_text, probability,
    nll, talr_weight, step. Rank zero writes and logs; every rank runs the forward pass (sharded
    models need all ranks).

    Resuming: the probe rows, the steps already logged and the files written are in the callback's
    checkpoint state, so a resumed run scores the same rows and continues the series. A fresh run
    refuses to overwrite parquet files of an earlier run unless `overwrite` is set.

    Args:
        num_examples: probe rows drawn from the training split (all rows when it has fewer).
        seed: which rows are drawn.
        every_n_steps: log every N optimizer steps; None logs at the end of every epoch.
        threshold: probability above which a token counts as easy (the paper uses 0.2).
        talr: the TALR strategy (talr.losses.TALR with its options) whose weights to report; see above.
        dirpath: where the parquet files go; default `<log_dir>/token_probs`.
        overwrite: let a fresh run replace another run's files in `dirpath`.
    """

    def __init__(
        self,
        num_examples: int = 16,
        seed: int = 0,
        every_n_steps: int | None = None,
        threshold: float = 0.2,
        talr: TALR | None = None,
        dirpath: str | None = None,
        overwrite: bool = False,
    ) -> None:
        if num_examples < 1:
            raise ValueError(f"TokenProbabilityLogger.num_examples must be at least 1, got {num_examples}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"TokenProbabilityLogger.every_n_steps must be at least 1 (or null: every epoch), got {every_n_steps}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"TokenProbabilityLogger.threshold must be in (0, 1), got {threshold}")
        if talr is not None and not isinstance(talr, TALR):
            raise TypeError(f"TokenProbabilityLogger.talr must be a talr.losses.TALR such as TALR(w_min=0.05), got {talr!r}")
        self.num_examples = num_examples
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.threshold = threshold
        self.talr = talr
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.probe_rows: list[int] = []
        self.logged_steps: list[int] = []
        self.files: list[str] = []
        self.restored = False  # True once a checkpoint's state for this callback was loaded

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_examples=self.num_examples, seed=self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"probe_rows": list(self.probe_rows), "logged_steps": list(self.logged_steps), "files": list(self.files)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_rows = [int(r) for r in state_dict["probe_rows"]]
        self.logged_steps = [int(s) for s in state_dict["logged_steps"]]
        self.files = list(state_dict.get("files", []))
        self.restored = True

    def output_dir(self, trainer: L.Trainer) -> Path:
        # trainer.log_dir broadcasts from rank 0: every rank must ask for it
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "token_probs"

    def result_paths(self, trainer: L.Trainer) -> list[Path]:
        return [self.output_dir(trainer)]

    def clear_results(self, trainer: L.Trainer) -> None:
        # overwrite: remove the earlier run's files so none mixes into this run's series
        out = self.output_dir(trainer)
        if trainer.is_global_zero and any(out.glob("step_*.parquet")):
            for stale in out.glob("step_*.parquet"):
                stale.unlink()
            rank_zero_info(f"[token_probs] overwrite: removed an earlier run's files from {out}")

    # -- hooks, in lifecycle order -------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_start, not on_fit_start: some strategies restore callback state after on_fit_start.
        if trainer.ckpt_path is not None and not self.restored:
            self.guard_results(trainer, always=True)  # the checkpoint is not of a run with this callback: its files are not ours
        if not self.probe_rows:
            self.probe_rows = self.choose_probe_rows(trainer)
        self.probe_examples(trainer)  # a resumed run with other data fails here, before training
        if trainer.global_step == 0 and 0 not in self.logged_steps:
            self.log_event(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps; a skipped (non-finite) step does not advance it
        if self.every_n_steps and step % self.every_n_steps == 0 and step not in self.logged_steps:
            self.log_event(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is None and trainer.global_step not in self.logged_steps:
            self.log_event(trainer, pl_module)

    # -- the probe set ---------------------------------------------------------------------------
    def choose_probe_rows(self, trainer: L.Trainer) -> list[int]:
        examples = trainer.datamodule.datasets["train"].examples
        rows = [e.row_index for e in examples]
        if len(rows) < self.num_examples:
            rank_zero_warn(f"TokenProbabilityLogger: the training split has {len(rows)} rows, fewer than "
                           f"num_examples={self.num_examples}; all of them are probed")
        return sorted(random.Random(self.seed).sample(rows, min(self.num_examples, len(rows))))

    def probe_examples(self, trainer: L.Trainer) -> list[Example]:
        by_row = {e.row_index: e for e in trainer.datamodule.datasets["train"].examples}
        missing = [r for r in self.probe_rows if r not in by_row]
        if missing:
            raise ValueError(
                f"TokenProbabilityLogger: probe row(s) {missing[:5]} from the checkpoint are not in this run's "
                f"training data ({len(by_row)} rows); the data changed since the checkpoint was written"
            )
        return [by_row[r] for r in self.probe_rows]

    # -- one logging event -----------------------------------------------------------------------
    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, np.ndarray]:
        """Every probe target token's probability and TALR weight under the current weights."""
        examples = self.probe_examples(trainer)
        per_row = [scores.nll for scores in score_examples(
            pl_module.net, examples, pl_module.tokenizer.pad_token_id, trainer.datamodule.eval_batch_size,
            pl_module.device, desc="token probabilities" if trainer.is_global_zero else None)]
        nll = torch.cat(per_row)
        seq_index = torch.cat([torch.full((len(row),), i) for i, row in enumerate(per_row)])
        # shift_targets orders a row's target tokens by position, as the scores are
        mask, targets = zip(*(shift_targets(torch.tensor([e.labels])) for e in examples))
        positions = [m[0].nonzero().flatten() + 1 for m in mask]  # position t predicts the token at t + 1
        talr = talr_strategy(pl_module, self.talr)
        # The strategy itself decides tau (fixed, or the median of the rows' mean losses) ...
        tau = talr(TokenBatch(nll, seq_index, len(examples))).metrics["tau"]
        weights = talr.weights(nll, tau)  # ... and the weight floor, exactly as in training
        return {
            "row_index": np.repeat([e.row_index for e in examples], [len(row) for row in per_row]).astype(np.int64),
            "position": torch.cat(positions).numpy().astype(np.int64),
            "token_id": torch.cat(targets).numpy().astype(np.int64),
            "probability": torch.exp(-nll).numpy().astype(np.float32),
            "nll": nll.numpy().astype(np.float32),
            "talr_weight": weights.numpy().astype(np.float32),
            "tau": np.float64(float(tau)),
            "w_min": np.float64(talr.w_min),
        }

    def summarize(self, scored: dict[str, np.ndarray]) -> dict[str, float]:
        probs, weights = scored["probability"], scored["talr_weight"]
        metrics = {f"token_probs/p{q}": float(v) for q, v in zip(QUANTILES, np.quantile(probs, [q / 100 for q in QUANTILES]))}
        metrics["token_probs/mean"] = float(probs.mean())
        metrics[f"token_probs/share_above_{self.threshold:g}"] = float((probs > self.threshold).mean())
        metrics["token_probs/talr_weight_mean"] = float(weights.mean())
        # compared in the weights' dtype, as TALR's own cutoff_share metric does (the floor is exact there)
        metrics["token_probs/talr_cutoff_share"] = float((weights <= weights.dtype.type(scored["w_min"])).mean())
        metrics["token_probs/talr_tau"] = float(scored["tau"])
        return metrics

    def log_event(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        out = self.output_dir(trainer)
        scored = self.score(trainer, pl_module)
        self.logged_steps.append(step)
        path = out / f"step_{step:06d}.parquet"
        if str(path) not in self.files:
            self.files.append(str(path))
        if not trainer.is_global_zero:
            return
        metrics = self.summarize(scored)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("token_probs/probability", scored["probability"], global_step=step)
                logger.experiment.add_histogram("token_probs/talr_weight", scored["talr_weight"], global_step=step)
        self.write_records(path, scored, pl_module.tokenizer, step)

    def write_records(self, path: Path, scored: dict[str, np.ndarray], tokenizer: Any, step: int) -> None:
        texts: dict[int, str] = {}
        for token_id in np.unique(scored["token_id"]).tolist():
            texts[token_id] = tokenizer.decode([token_id])  # readable text, not byte-level BPE symbols
        table = pa.table({
            "row_index": scored["row_index"],
            "position": scored["position"],
            "token_id": scored["token_id"],
            "token_text": [texts[t] for t in scored["token_id"].tolist()],
            "probability": scored["probability"],
            "nll": scored["nll"],
            "talr_weight": scored["talr_weight"],
            "step": np.full(len(scored["token_id"]), step, dtype=np.int64),
        })
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        write_atomic(path, buffer.getvalue().to_pybytes())  # a crash never leaves half a parquet file
