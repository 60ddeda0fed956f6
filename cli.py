"""`talr fit|validate|test --config ...`: LightningCLI over SFTModule and SFTDataModule."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from talr.checkpoint_io import AtomicCheckpointIO
from talr.data import SFTDataModule
from talr.module import SFTModule


class TalrCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data's chat template and the model must come from the same checkpoint.
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_argument(
            "--validate_before_fit", type=bool, default=True,
            help="Score the initial model on the validation set before training (the 'before' number).",
        )

    def instantiate_trainer(self, **kwargs):
        # Checkpoints are written atomically unless the config brings its own plugins.
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        config = self.config.get(self.subcommand, {})
        if config.get("validate_before_fit") and not config.get("ckpt_path"):
            self.trainer.validate(self.model, datamodule=self.datamodule)


def build_cli(args: list[str] | None = None) -> TalrCLI:
    """Parse `args` (default: sys.argv) and run the subcommand; returns the CLI for inspection."""
    return TalrCLI(SFTModule, SFTDataModule, args=args, save_config_kwargs={"overwrite": True})


def main() -> None:
    build_cli()


if __name__ == "__main__":
    main()
