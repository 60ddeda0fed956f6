"""`talr fit|validate|test --config ...`: LightningCLI over SFTModule and SFTDataModule."""

from __future__ import annotations

import importlib
import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from talr.checkpoint_io import AtomicCheckpointIO, latest_logger_version
from talr.config_migration import loss_config_error, raw_model_section
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

    def parse_arguments(self, parser, args) -> None:
        # An old-form loss (`loss: talr` + loss_options) gets one error with the new form, not the parser's.
        if args is None or isinstance(args, (list, tuple)):
            error = loss_config_error(raw_model_section(sys.argv[1:] if args is None else args))
            if error:
                raise ValueError(error)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the model's options with the checkpoint's. Say so where the config set
        # them, and refuse outright when the checkpoint comes from another model than the one asked for.
        subcommand = self.config.get("subcommand")
        section = self.config.get(subcommand) if subcommand else None
        if section is None or section.get("model") is None:
            return super()._parse_ckpt_path()
        asked = section.model.clone()
        defaults = self._subcommand_parsers[subcommand].get_defaults().model
        super()._parse_ckpt_path()
        used = self.config[subcommand].model
        set_here = {k for k in vars(used) if asked.get(k) != defaults.get(k)}
        if "model" in set_here and asked.get("model") != used.get("model"):
            raise ValueError(
                f"--ckpt_path {section.ckpt_path} was trained from model.model={used.get('model')!r}, "
                f"but the config asks for {asked.get('model')!r}; use a checkpoint of that model or drop model.model"
            )
        for key in sorted(set_here):
            if asked.get(key) != used.get(key):
                rank_zero_warn(f"model.{key}: using the checkpoint's {used.get(key)!r}, not {asked.get(key)!r} from the config")

    def before_instantiate_classes(self) -> None:
        # `--ckpt_path last` with a versioned logger: continue in the version that holds the newest
        # last.ckpt, where Lightning then finds it (it only looks in the new run's directory).
        config = self.config.get(self.subcommand, {})
        logger = config.get("trainer", {}).get("logger")
        if config.get("ckpt_path") != "last" or not getattr(logger, "init_args", None):
            return
        args = logger.init_args
        if args.get("version") is None and args.get("save_dir"):
            version = latest_logger_version(args.save_dir, args.get("name"))
            if version is not None:
                args.version = version
                rank_zero_info(f"[talr] --ckpt_path last: resuming the run in {args.save_dir}/{args.get('name') or ''}/{version}")

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


# Plain subcommands beside LightningCLI's fit/validate/test: name -> "module:function", where the
# function takes the remaining arguments and returns the exit status.
EXTRA_COMMANDS = {"cot": "talr.cot:main", "sweep": "talr.sweep:main", "report": "talr.report:main"}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in EXTRA_COMMANDS:
        module, function = EXTRA_COMMANDS[args[0]].split(":")
        sys.exit(getattr(importlib.import_module(module), function)(args[1:]))
    if args in (["-h"], ["--help"]):  # LightningCLI's help lists only its own subcommands
        print(f"talr also has: {', '.join(EXTRA_COMMANDS)} (talr <command> --help)\n")
    build_cli(argv)


if __name__ == "__main__":
    main()
