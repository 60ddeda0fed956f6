"""lm-eval's HFLM against talr's SharedContextHFLM on the embedded model: time and agreement, in one run.

Both score the same documents of the offline ARC-Easy, PIQA and HellaSwag tasks (GeneralBenchmarks'
files, $TALR_BENCH_DIR or --data-dir), one after the other in this process, HFLM first. Prints each
task's seconds both ways, the ratio, and how many documents' correctness differ (expected: none).

    python benchmarks/shared_context.py --data-dir ../shared/data --limit 100
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from callbacks.general_benchmarks import GeneralBenchmarks, per_document_scores, run_lm_eval
from talr.models import embedded_model_dir, load_model, load_tokenizer

TASKS = ["talr_arc_easy", "talr_piqa", "talr_hellaswag"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("TALR_BENCH_DIR"), help="the benchmark files")
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=16, help="HFLM's batch size")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("give --data-dir (or set TALR_BENCH_DIR) to the benchmark files, e.g. ../shared/data")
    callback = GeneralBenchmarks(tasks=TASKS, data_dir=args.data_dir)
    model = load_model(str(embedded_model_dir()), "float32").eval()
    tokenizer = load_tokenizer(str(embedded_model_dir()))
    totals = {False: 0.0, True: 0.0}
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # lm-eval records `git describe` of the working directory
        for task in TASKS:
            seconds, documents = {}, {}
            for shared in (False, True):
                start = time.perf_counter()
                with torch.no_grad():
                    evaluation = run_lm_eval(model, tokenizer, [task], callback.task_manager, limit=args.limit,
                                             batch_size=args.batch_size, log_samples=True, log=lambda _: None,
                                             shared_context=shared)
                seconds[shared] = time.perf_counter() - start
                totals[shared] += seconds[shared]
                documents[shared] = per_document_scores(evaluation, task, callback.primary_metrics[task])["values"]
            differ = sum(a != b for a, b in zip(documents[False], documents[True], strict=True))
            print(f"{task:16s} HFLM {seconds[False]:6.1f} s, shared contexts {seconds[True]:6.1f} s: "
                  f"{seconds[False] / seconds[True]:.2f}x faster; {differ} of {len(documents[False])} documents differ",
                  flush=True)
    print(f"all three: HFLM {totals[False]:.1f} s, shared contexts {totals[True]:.1f} s: "
          f"{totals[False] / totals[True]:.2f}x faster")


if __name__ == "__main__":
    main()
