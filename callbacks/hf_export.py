"""Export the fine-tuned model as a Hugging Face directory (safetensors) when fitting ends."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from talr.models import export_pretrained
from talr.results import refuse_to_overwrite, resumes_its_own_run

LM_PREFIX = "net.lm."


def lm_state_from_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The causal LM's weights from a Lightning checkpoint of SFTModule (tensors only, no pickled code)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len(LM_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(LM_PREFIX)}
    if not state:
        raise ValueError(f"{path}: no '{LM_PREFIX}*' weights; is this a talr SFTModule checkpoint?")
    return state


class HFExport(Callback):
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
        self._checked = False
        self.exported_to: Path | None = None

    def output_dir(self, trainer: L.Trainer) -> Path:
        # trainer.log_dir broadcasts from rank 0: every rank must ask for it
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "export"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # at the first setup, so before the CLI's validate-before-fit writes anything of this run
        out = self.output_dir(trainer)
        if not (self.overwrite or self._checked or resumes_its_own_run(trainer)):
            refuse_to_overwrite([out], "HFExport.overwrite")
        self._checked = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.output_dir(trainer)
        if not trainer.is_global_zero:
            return
        lm = pl_module.lm
        source = "final weights"
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if self.which == "best" and best:
            lm = copy.deepcopy(lm)  # leave the live module's weights as training ended
            lm.load_state_dict(lm_state_from_checkpoint(best))
            source = f"best checkpoint {best}"
        self.exported_to = export_pretrained(lm, pl_module.tokenizer, out, merge_lora=self.merge_lora)
        rank_zero_info(f"[talr] exported {source} to {out} (AutoModelForCausalLM.from_pretrained loads it)")
