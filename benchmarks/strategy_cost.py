"""Step time and peak memory of every loss strategy, as ratios to `ce`, measured in one run.

Each strategy trains in its own subprocess (so peak memory is its own) on the embedded default
model and generated MedCalc rows; the first steps warm up, the median of the rest is reported.

    python benchmarks/strategy_cost.py                 # all strategies, CPU, about 10 minutes
    python benchmarks/strategy_cost.py --steps 6 --max-length 512 --batch-size 4
    python benchmarks/strategy_cost.py --strategies eaft asft stm rho1   # these, and ce to compare with
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from talr.losses import DFT, EAFT, FLOW, TALR, CrossEntropy, KLToInitial, L2Anchor, Rho1, SelectiveTokenMasking

STRATEGIES: dict[str, dict] = {  # SFTModule options of each measured strategy
    "ce": {"loss": CrossEntropy()},
    "talr": {"loss": TALR()},
    "dft": {"loss": DFT()},
    "flow": {"loss": FLOW()},
    "l2": {"loss": L2Anchor(lam=1e-3)},
    "kl (k3)": {"loss": KLToInitial(estimator="k3")},
    "kl (exact)": {"loss": KLToInitial(estimator="exact")},
    "eaft": {"loss": EAFT()},
    "asft": {"loss": KLToInitial(estimator="exact", direction="initial_model", base=DFT())},
    "stm": {"loss": SelectiveTokenMasking()},
    "rho1": {"loss": Rho1()},
    "lora (ce)": {"loss": CrossEntropy(), "lora": {"r": 64, "alpha": 128}},
    "lora + kl (k3)": {"loss": KLToInitial(), "lora": {"r": 64, "alpha": 128}},
}


def measure(name: str, steps: int, warmup: int, max_length: int, batch_size: int, micro: int) -> dict:
    import lightning as L

    from talr.data import SFTDataModule
    from talr.module import SFTModule
    from talr.tasks import MedCalc

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            self.times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    task = MedCalc(source="synthetic", num_synthetic=batch_size * (steps + warmup) + 4, seed=0)
    data = SFTDataModule(task, max_length=max_length, overlength="truncate", val_size=4,
                         batch_size=batch_size, micro_batch_size=micro, seed=0)
    module = SFTModule(model="smollm2-135m-instruct", learning_rate=1e-5, generate=False, **STRATEGIES[name])
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps + warmup, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, datamodule=data)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": statistics.median(timer.times[warmup:]), "peak_bytes": peak,
            "memory": "cuda max allocated" if torch.cuda.is_available() else "process peak RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), metavar="NAME",
                        help=f"measure only these (ce is always measured, as the baseline): {', '.join(STRATEGIES)}")
    parser.add_argument("--only", choices=list(STRATEGIES), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    shape = (args.steps, args.warmup, args.max_length, args.batch_size, args.micro_batch_size)
    if args.only:
        print("RESULT " + json.dumps(measure(args.only, *shape)))
        return
    results = {}
    for name in ["ce", *[s for s in args.strategies if s != "ce"]] if args.strategies else STRATEGIES:
        out = subprocess.run([sys.executable, __file__, "--only", name, "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--max-length", str(args.max_length),
                              "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size)],
                             capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len("RESULT "):])
        print(f"measured {name}: {results[name]['step_s']:.2f} s/step", file=sys.stderr, flush=True)
    base = results["ce"]
    print(f"\nSmolLM2-135M-Instruct, {results['ce']['memory']}, batch {args.batch_size} x {args.max_length} tokens, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print("| strategy | s/step | time vs ce | peak memory (GiB) | memory vs ce |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f}x | "
              f"{r['peak_bytes'] / 2**30:.2f} | {r['peak_bytes'] / base['peak_bytes']:.2f}x |")


if __name__ == "__main__":
    main()
