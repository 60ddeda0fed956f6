"""Peak memory of the vocabulary projection + TALR-weighted cross-entropy: plain vs chunked.

For each vocabulary size and target length, one subprocess per variant runs forward, TALR
weighting and backward through `target_token_nll` on random hidden states (hidden size 576, as
SmolLM2-135M; every position a target) and reports the memory it needed above its inputs: CUDA's
peak allocation on a GPU, the process's peak resident set size on the CPU. Prints one table with
the ratio plain / chunked, measured in this run.

    python benchmarks/chunked_loss_memory.py                      # vocab 49,152 and 151,936; 1k to 8k
    python benchmarks/chunked_loss_memory.py --lengths 1024 2048 --chunk-size 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def measure(vocab: int, length: int, hidden: int, chunk_size: int | None, device: str) -> dict:
    from talr.losses import TALR, TokenBatch
    from talr.token_loss import target_token_nll

    torch.manual_seed(0)
    h = torch.randn(1, length + 1, hidden, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, length + 1), device=device)
    talr = TALR()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    nll, seq_index = target_token_nll(h, w, labels, chunk_size=chunk_size)
    total = talr(TokenBatch(nll, seq_index, 1)).total / nll.numel()
    total.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": peak, "seconds": time.perf_counter() - start, "loss": float(total)}


def run_one(vocab: int, length: int, hidden: int, chunk_size: int | None, device: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {repr(str(sys.path[0]))}); from chunked_loss_memory import measure; "
            f"print(json.dumps(measure({vocab}, {length}, {hidden}, {chunk_size}, {device!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    gib = 2**30
    print(f"device {args.device}, hidden {args.hidden}, chunk {args.chunk_size} tokens; memory above the inputs")
    print(f"{'vocab':>7} {'length':>6} | {'plain GiB':>9} {'chunked GiB':>11} {'plain/chunked':>13} | "
          f"{'plain s':>7} {'chunked s':>9} | same loss")
    for vocab in args.vocabs:
        for length in args.lengths:
            plain = run_one(vocab, length, args.hidden, None, args.device)
            chunked = run_one(vocab, length, args.hidden, args.chunk_size, args.device)
            if "error" in plain or "error" in chunked:
                print(f"{vocab:>7} {length:>6} | plain: {plain.get('error', 'ok')}; chunked: {chunked.get('error', 'ok')}")
                continue
            ratio = plain["peak_bytes"] / max(chunked["peak_bytes"], 1)
            same = abs(plain["loss"] - chunked["loss"]) <= 1e-5 * abs(plain["loss"])
            print(f"{vocab:>7} {length:>6} | {plain['peak_bytes'] / gib:9.2f} {chunked['peak_bytes'] / gib:11.2f} "
                  f"{ratio:12.1f}x | {plain['seconds']:7.2f} {chunked['seconds']:9.2f} | {same}")


if __name__ == "__main__":
    main()
