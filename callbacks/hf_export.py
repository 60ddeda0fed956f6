"""Export the fine-tuned model as a Hugging Face directory (safetensors) when fitting ends."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.fsdp import FSDPModule

from talr.checkpoint_io import full_state_dict, lm_state_from_checkpoint
from talr.models import export_pretrained, is_peft
from talr.results import GuardsResults

class HFExport(GuardsResults):
    """At fit end, write `save_pretrained` output that `AutoModelForCausalLM.from_pretrained` loads.

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
            self.exported_to = export_pretrained(pl_module.lm, pl_module.tokenizer, out, self.merge_lora, state_dict=state)
            rank_zero_info(f"[talr] exported {f'best checkpoint {best}' if use_best else 'final weights'} to {out} "
                           "(AutoModelForCausalLM.from_pretrained loads it)")
            return
        if not trainer.is_global_zero:
            return
        lm = pl_module.lm
        source = "final weights"
        if self.which == "best" and best:
            lm = copy.deepcopy(lm)  # leave the live module's weights as training ended
            lm.load_state_dict(lm_state_from_checkpoint(best, pl_module.lm_prefix))
            source = f"best checkpoint {best}"
        self.exported_to = export_pretrained(lm, pl_module.tokenizer, out, merge_lora=self.merge_lora)
        rank_zero_info(f"[talr] exported {source} to {out} (AutoModelForCausalLM.from_pretrained loads it)")
