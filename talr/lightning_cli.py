"""`talr fit|validate|test`: LightningCLI over SFTModule and SFTDataModule.

Imported by cli.py only when one of these commands runs, so that `talr --help` and
`talr --version` answer without loading torch and Lightning.
"""

from __future__ import annotations

import os
import sys
import re
from typing import Any, NoReturn, Sequence

from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from talr.checkpoint_io import AtomicCheckpointIO, latest_logger_version
from talr.config_migration import loss_config_error, raw_model_section
from talr.data import SFTDataModule
from talr.module import SFTModule
from talr.progress import on_terminal

PROG = "talr"

_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_GIVEN_VALUE = re.compile(r"(?:Given value|Got value): (.*)$", re.MULTILINE)


def summarize_parse_error(message: str) -> str:
    """One line for a jsonargparse error; a nested one becomes `<option>: invalid value <v>`.

    jsonargparse explains a bad value over several lines (each nested key, each type it tried);
    the summary names the full option, which the nesting spreads over those lines.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    option = ".".join(_PARSER_KEY.findall(message)) or lines[0].rstrip(":")
    values = _GIVEN_VALUE.findall(message)
    if values:
        return f"{option}: invalid value {values[-1].strip()!r} (the reasons are above)"
    return f"{option}: {lines[-1]}"


class TalrArgumentParser(LightningArgumentParser):
    """jsonargparse's parser whose errors end in one `talr: error: ...` line."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # Kept as jsonargparse has it (usage, tip, the full message, exit status 2); only the
        # last line is talr's summary, so the error reads the same as talr's own (talr/errors.py).
        # A nested parser (a class's options) raises its error into the outer one's message instead.
        exits = self.exit_on_error and not os.environ.get("JSONARGPARSE_DEBUG")
        if exits and len(message.strip().splitlines()) > 1:
            message = f"{message.rstrip()}\n{PROG}: error: {summarize_parse_error(message)}"
        else:
            message = message.strip()
        super().error(message, ex)


class TalrCLI(LightningCLI):
    def __init__(self, args: Any = None, default_callbacks: Sequence[type[Callback]] = (),
                 log_progress_bar: type[ProgressBar] | None = None, **kwargs: Any) -> None:
        # Callback classes every run gets unless its config has one of that class (cli.py names them:
        # the library does not import callbacks/). They go first, in this order: a step clock
        # (callbacks.throughput) must stop before other callbacks' batch-end work.
        self.default_callbacks = tuple(default_callbacks)
        # Where stdout is not a terminal (a log file), this bar replaces the live one Lightning adds itself.
        self.log_progress_bar = log_progress_bar
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": PROG})
        super().__init__(SFTModule, SFTDataModule, parser_class=TalrArgumentParser, args=args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # SFTModule has no predict_step: `talr predict` would fail only after loading everything.
        commands = dict(LightningCLI.subcommands())
        del commands["predict"]
        return commands

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # LightningCLI adds the trainer first; argparse prints groups in the order they were added,
        # so talr's own options (model.*, data.*) come first in `talr fit --help` this way.
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
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
        configured = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])  # Trainer extends it
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks[:0] = [callback_class() for callback_class in self.default_callbacks
                                 if not any(isinstance(c, callback_class) for c in trainer.callbacks)]
        bar = trainer.progress_bar_callback  # None with enable_progress_bar: false
        if self.log_progress_bar and bar is not None and not on_terminal() and not any(c is bar for c in configured):
            trainer.callbacks[trainer.callbacks.index(bar)] = self.log_progress_bar()  # a bar the config names stays
        return trainer

    def before_fit(self) -> None:
        config = self.config.get(self.subcommand, {})
        if config.get("validate_before_fit") and not config.get("ckpt_path"):
            self.trainer.validate(self.model, datamodule=self.datamodule)
