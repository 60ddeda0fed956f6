"""Training throughput of `talr fit` against TRL's SFTTrainer on the same model, rows and batches.

Both train SmolLM2-135M-Instruct (the embedded default, float32 on the CPU, bf16 on a GPU) on the
same MedCalc rows, rendered by talr's chat template into a prompt and a completion, truncated to
the same length (the target's tail is cut), 4 rows a step, no packing. The rows are the first
ones, in file order, whose prompt fits `--max-length` with room for some target (a longer prompt
would leave TRL nothing to train on and talr nothing to keep); the script prints how many it
skipped and cut, and the Row Numbers it took. TRL runs with its completion-only loss (`nll`) and with its `dft` loss (the
token-weighted case); talr with `ce` and `talr`. Each variant runs in its own subprocess, one
after another; a variant that fails stops the benchmark (and what that variant started). The
first steps warm up and tokens per second is counted over the rest (all non-padding tokens of
each step's batch, prompt included). Needs `pip install trl`.

    python benchmarks/trl_throughput.py                 # about 10 minutes on a 2-core CPU
    python benchmarks/trl_throughput.py --steps 6 --warmup 2 --rows-csv ../shared/data/medcalc/medcalc_bench_test.csv
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def select_rows(args: argparse.Namespace) -> Path:
    """The first rows whose prompt fits `--max-length`, written to a JSONL file that every variant reads."""
    from talr.data import encode_example, turn_end_text
    from talr.models import load_tokenizer
    from talr.results import write_atomic
    from talr.tasks import MedCalc

    needed = args.batch_size * (args.steps + args.warmup) + 1  # + 1: talr's validation row
    tokenizer = load_tokenizer(MODEL)
    # Generated rows: a longer draw starts with the same rows, so spares change nothing when all fit.
    task = MedCalc(source=args.rows_csv or "synthetic", num_synthetic=2 * needed, seed=0)
    end = turn_end_text(tokenizer)
    chosen, seen, cut = [], 0, 0
    for i, row in enumerate(task.read()):
        if len(chosen) == needed:
            break
        seen += 1
        example = encode_example(tokenizer, task, row, i, args.max_length, "truncate", end)
        if example is not None:  # None: the prompt alone fills max_length
            chosen.append(row)
            cut += example.truncated
    source = args.rows_csv or "generated rows"
    if len(chosen) < needed:
        sys.exit(f"{source}: only {len(chosen)} of {seen} rows have a prompt shorter than --max-length "
                 f"{args.max_length}; {needed} are needed (--batch-size x (--steps + --warmup) + 1)")
    numbers = ", ".join(row.get("Row Number") or str(i + 1) for i, row in enumerate(chosen))
    print(f"rows: the first {needed} of {source} whose prompt fits max_length={args.max_length} "
          f"({seen - needed} of the first {seen} skipped as longer; {cut} of the {needed} get their target's "
          f"tail cut); Row Numbers: {numbers}", flush=True)
    return write_atomic(Path(args.workdir) / "rows.jsonl", "".join(json.dumps(row) + "\n" for row in chosen))


def prompt_completion_rows(rows_file: str) -> list[dict]:
    from talr.data import prompt_text, turn_end_text
    from talr.models import load_tokenizer
    from talr.tasks import MedCalc

    tokenizer = load_tokenizer(MODEL)
    task = MedCalc(source=rows_file)
    end = turn_end_text(tokenizer)
    return [{"prompt": prompt_text(tokenizer, task, row), "completion": task.target(row) + end} for row in task.read()]


class StepClock:
    """Wall time and non-padding tokens of each optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, tokens: int) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.tokens.append(tokens)

    def throughput(self, warmup: int) -> float:
        return sum(self.tokens[warmup:]) / sum(self.times[warmup:])


def run_talr(loss: str, args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from talr.data import SFTDataModule
    from talr.module import SFTModule
    from talr.tasks import MedCalc

    clock = StepClock()

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.stop(sum(int(m["attention_mask"].sum()) for m in batch["micro_batches"]))

    torch.manual_seed(0)
    data = SFTDataModule(MedCalc(source=args.selected_rows), max_length=args.max_length, overlength="truncate",
                         val_size=1, batch_size=args.batch_size, micro_batch_size=args.batch_size, seed=0,
                         group_by_length=False)
    module = SFTModule(model=MODEL, loss=loss, learning_rate=1e-5, generate=False, gradient_clip_val=1.0)
    trainer = L.Trainer(max_steps=args.steps + args.warmup, accelerator="auto", devices=1, logger=False,
                        precision="bf16-true" if torch.cuda.is_available() else "32-true",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Clock()])
    trainer.fit(module, datamodule=data)
    return {"tokens_per_s": clock.throughput(args.warmup), "steps": len(clock.times)}


def run_trl(loss_type: str, args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from talr.models import load_model, load_tokenizer

    clock = StepClock()
    batches: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.start()

        def on_step_end(self, *_, **__):
            clock.stop(batches[-1] if batches else 0)

    dataset = Dataset.from_list(prompt_completion_rows(args.selected_rows))
    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL, "bfloat16" if torch.cuda.is_available() else "float32")
    config = SFTConfig(
        output_dir=str(Path(args.workdir) / f"trl-{loss_type}"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + args.warmup, learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0,
        max_grad_norm=1.0, max_length=args.max_length, packing=False, completion_only_loss=True,
        loss_type=loss_type, logging_steps=1000, save_strategy="no", report_to=[], seed=0,
        bf16=torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Clock()])
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        batches.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    return {"tokens_per_s": clock.throughput(args.warmup), "steps": len(clock.times)}


VARIANTS = {
    "talr fit, ce": ("talr", "ce"),
    "TRL SFTTrainer, completion-only nll": ("trl", "nll"),
    "talr fit, talr": ("talr", "talr"),
    "TRL SFTTrainer, dft": ("trl", "dft"),
}


def run_variant(name: str, argv: list[str]) -> dict:
    """One variant in its own process group; the group goes when it ends (or the benchmark is stopped)."""
    child = subprocess.Popen([sys.executable, __file__, *argv, "--one", name], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = child.communicate()
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # whatever the variant started and left behind
        except ProcessLookupError:
            pass
    if child.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-15:])
        sys.exit(f"{tail}\n\nstopped: variant {name!r} failed with exit status {child.returncode} (its last "
                 "lines are above); the variants after it were not run")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rows-csv", default=None, help="MedCalc CSV (default: generated rows)")
    parser.add_argument("--workdir", default="/tmp/talr-trl-bench")
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--selected-rows", help=argparse.SUPPRESS)  # select_rows' file, for --one
    args = parser.parse_args()

    if args.one:
        kind, loss = VARIANTS[args.one]
        print(json.dumps((run_talr if kind == "talr" else run_trl)(loss, args)))
        return
    if importlib.util.find_spec("trl") is None:
        sys.exit("the TRL variants need trl: pip install trl")
    # `kill` on the benchmark unwinds like Ctrl-C, so run_variant takes the running variant with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    rows_file = select_rows(args)
    results = {}
    for name in VARIANTS:
        results[name] = run_variant(name, [*sys.argv[1:], "--selected-rows", str(rows_file)])
        print(f"  {name}: {results[name]}", flush=True)

    def ratio(a: str, b: str) -> str:
        return f"{results[a]['tokens_per_s'] / results[b]['tokens_per_s']:.2f}x"

    print(f"\nbatch {args.batch_size}, max_length {args.max_length}, {args.steps} timed steps after {args.warmup} warmup")
    print(f"{'variant':<40} {'tokens/s':>9}")
    for name, result in results.items():
        print(f"{name:<40} {result['tokens_per_s']:9.1f}")
    print(f"talr ce / TRL nll: {ratio('talr fit, ce', 'TRL SFTTrainer, completion-only nll')}; "
          f"talr talr / TRL dft: {ratio('talr fit, talr', 'TRL SFTTrainer, dft')}")


if __name__ == "__main__":
    main()
