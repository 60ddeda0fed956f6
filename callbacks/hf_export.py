"""Export the fine-tuned model as a Hugging Face directory (safetensors) when fitting ends."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.fsdp import FSDPModule

from callbacks.run_summary import RunSummary
from talr.checkpoint_io import full_state_dict, lm_state_from_checkpoint
from talr.model_card import describe_run, scores_from_summary, write_model_card
from talr.models import export_pretrained, is_peft
from talr.results import GuardsResults


class HFExport(GuardsResults):
    """At fit end, write `save_pretrained` output that `AutoModelForCausalLM.from_pretrained` loads,
    and a model card (`README.md`, talr.model_card) beside it.

    The card is written at teardown, after every callback's fit end, from the run summary
    (`RunSummary.summary`; `talr fit` adds a RunSummary to every run): the base model, the data, the
    strategy and its options, and the domain, general and drift numbers before fine-tuning and of
    the exported weights (the summary's best step for `which: best`, its last validation for `last`).

    Args:
        dirpath: output directory; default `<log_dir>/export`.
        which: `best` exports the checkpoint ModelCheckpoint kept as best on its monitored metric
            (the paper's selection: best on the domain), `last` the weights at the end of training.
        merge_lora: merge LoRA adapters into a plain model (default), or save the adapters only.
        overwrite: replace an earlier run's export in `dirpath` (otherwise the run stops at start).
    """

    def __init__(self, dirpath: str | None = None, which: Literal["best", "last"] = "best", merge_lora: bool = True,
                 overwrite: bool = False) -> None:
        if which not in ("best", "last"):
            raise ValueError(f"HFExport.which must be 'best' or 'last', got {which!r}")
        self.dirpath = dirpath
        self.which = which
        self.merge_lora = merge_lora
        self.overwrite = overwrite
        self.exported_to: Path | None = None
        self.exported_which: str | None = None  # best or last: what the export holds

    def output_dir(self, trainer: L.Trainer) -> Path:
        # trainer.log_dir broadcasts from rank 0: every rank must ask for it
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "export"

    def result_paths(self, trainer: L.Trainer) -> list[Path]:
        return [self.output_dir(trainer)]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.output_dir(trainer)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        best = trainer.strategy.broadcast(best)  # ranks must agree on whether to gather below
        if isinstance(pl_module.net, FSDPModule):  # sharded weights: no deepcopy, a full state dict instead
            if is_peft(pl_module.lm) and self.merge_lora:
                raise NotImplementedError("HFExport: merging LoRA adapters of an FSDP2 run is not supported; set merge_lora: false")
            use_best = self.which == "best" and bool(best)
            state = {} if use_best else full_state_dict(pl_module.lm)  # the gather runs on every rank
            if not trainer.is_global_zero:
                return
            if use_best:
                state = lm_state_from_checkpoint(best, pl_module.lm_prefix)
            self.exported_which = "best" if use_best else "last"
            self.exported_to = export_pretrained(pl_module.lm, pl_module.tokenizer, out, self.merge_lora, state_dict=state)
            rank_zero_info(f"[talr] exported {f'best checkpoint {best}' if use_best else 'final weights'} to {out} "
                           "(AutoModelForCausalLM.from_pretrained loads it)")
            return
        if not trainer.is_global_zero:
            return
        lm = pl_module.lm
        source, self.exported_which = "final weights", "last"
        if self.which == "best" and best:
            lm = copy.deepcopy(lm)  # leave the live module's weights as training ended
            lm.load_state_dict(lm_state_from_checkpoint(best, pl_module.lm_prefix))
            source, self.exported_which = f"best checkpoint {best}", "best"
        self.exported_to = export_pretrained(lm, pl_module.tokenizer, out, merge_lora=self.merge_lora)
        rank_zero_info(f"[talr] exported {source} to {out} (AutoModelForCausalLM.from_pretrained loads it)")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After every callback's on_fit_end, whatever their order: the summary's fit-end numbers exist.
        if stage != "fit" or self.exported_to is None or trainer.interrupted:
            return
        summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
        scores, notes = [], []
        if summary is not None and any(summary.monitor in entry for entry in summary.history):
            numbers = summary.summary(trainer, pl_module, None)
            scores = scores_from_summary(numbers, self.exported_which)
            notes.append(f"Selection: best step {numbers['best_step']} of {numbers['steps']} on `{numbers['monitor']}`"
                         f"; this export holds the {'best' if self.exported_which == 'best' else 'last'} weights.")
            followed = getattr(trainer.checkpoint_callback, "monitor", None)
            if self.exported_which == "best" and followed != summary.monitor:
                notes.append(f"The exported checkpoint was kept as best on `{followed}`, the numbers' best step on "
                             f"`{summary.monitor}`: they may differ.")
        write_model_card(self.exported_to, describe_run(trainer, pl_module), scores, notes)
