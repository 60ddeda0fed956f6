"""Memory as a budget: the largest micro-batch, with activation checkpointing only where needed, whose
training step fits `data.memory_budget`, measured with trial steps on the real model and data.

Who decides what. The data module owns the micro-batch size and the module owns the model; both are
known, and the model sits on its device, in `SFTModule.on_fit_start` (after FLOW's pre-pass, before
Lightning builds the training loader). There the module calls `choose_memory_settings` with a trial
function that runs its own training path on one micro-batch (forward, loss, backward; no optimizer
step), and applies the answer: `datamodule.micro_batch_size`, the model's gradient checkpointing and
the loss's chunk size.
The choice cannot change results: the module divides each step's loss by the step's target-token
count before any backward (exact accumulation at any micro-batch size), checkpointing recomputes
activations, it does not approximate them, and the chunked loss sums the same terms chunk by chunk.

What is measured. `PeakMemory` reads the peak of the process since a reset: on a CPU the resident
set (Linux: VmHWM after resetting it through /proc/self/clear_refs, exact; elsewhere psutil sampled
every millisecond), on a GPU `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. A
trial runs the longest micro-batch the data can produce (the longest rows, padded to the longest, as
StepCollator's first chunk of a step holds them). AdamW's two moments per trainable weight do not
exist yet at that point (the first optimizer step allocates them, with temporaries while it runs:
weight-sized on a GPU's foreach path, one tensor's worth on a CPU, talr.schedule.adamw_foreach), so
they are added to the trial's peak: the need of a setting is max(trial peak, memory after backward +
the step's temporaries) + 2 x weights, in bytes of the trainable weights.

The search: micro-batch 1, then 2, then the size that a straight line through the measured points
predicts for the budget, verified by its own trial, until the largest fitting size is known (memory
grows linearly with the micro-batch at a fixed padded length). Without checkpointing first; then,
with `model.gradient_checkpointing: selective`, selective checkpointing (the layers' widening matmuls
kept, the rest recomputed: about a fifth more step time); then full (about a third more), each only
when even micro-batch 1 does not fit at the level before (talr.models.set_gradient_checkpointing). A
strategy that pays a forward anyway when a step is split (TALR) goes from the one-row trial straight
to the whole step checkpointed, selective before full (where a one-row selective trial predicts that
it fits), when the one-row trial already shows that the whole step cannot fit without. A checkpointed
setting also chunks the loss's projection onto the vocabulary (`BUDGET_LOSS_CHUNK`), its trials included.

How memory is allocated on a CPU (talr/allocator.py). Every trial and training step starts by giving
the memory freed before it back to the system, so its peak is measured from what is live. Under
tcmalloc, which `talr fit` preloads where it is installed, the step then reuses its own freed blocks.
Under glibc, blocks above 128 KiB are mapped on their own in training steps
(`return_large_blocks_at_once`): its heap would keep freed pages between live blocks and peak above
the trial.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.utilities import rank_zero_info

from talr.allocator import current_allocator, release_free_memory
from talr.models import CHECKPOINTING_LEVELS, checkpointing_level, set_gradient_checkpointing
from talr.schedule import adamw_foreach

GIB = 2**30
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|[kmgt]i?b|b)\s*$", re.IGNORECASE)
_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
MAX_TRIALS = 6  # per checkpointing setting; the search needs 3 or 4 on real data


class MemoryBudgetError(ValueError):
    """The budget cannot hold a training step (a user error: the message names the budget and the need)."""


def parse_budget(text: str) -> tuple[float, bool]:
    """`'4GiB'` -> (4 * 2**30, False); `'50%'` -> (0.5, True): bytes, or a share of the free memory.

    Units: B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024), any case."""
    match = _BUDGET.match(str(text))
    if not match:
        raise MemoryBudgetError(
            f"data.memory_budget: cannot read {text!r}; write an amount such as 4GiB, 3.5GB, 2048MiB, "
            "or a share of the free memory such as 50%")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if not 0 < value <= 100:
            raise MemoryBudgetError(f"data.memory_budget: a share must be in (0%, 100%], got {text!r}")
        return value / 100, True
    if value <= 0:
        raise MemoryBudgetError(f"data.memory_budget must be positive, got {text!r}")
    return value * _UNITS[unit], False


def budget_bytes(text: str, device: torch.device) -> int:
    """The budget in bytes. A share counts what the process already holds as free: on a CPU it is a
    share of (available system memory + this process's resident set), on a GPU of (free device
    memory + what torch has reserved)."""
    value, share = parse_budget(text)
    if not share:
        return int(value)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(value * (free + torch.cuda.memory_reserved(device)))
    import psutil  # a dependency of peft

    return int(value * (psutil.virtual_memory().available + psutil.Process().memory_info().rss))


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# -- measuring ------------------------------------------------------------------------------------------
def _vm_kib(field: str) -> int | None:
    """A `Vm...` line of /proc/self/status in KiB; None where there is no /proc."""
    try:
        text = _PROC_STATUS.read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_THRESHOLD = 128 * 2**10
REUSE_THRESHOLD = 32 * 2**20  # the highest glibc raises its own threshold to (64-bit)


def _set_glibc_thresholds(mmap_threshold: int, trim_threshold: int) -> None:
    if current_allocator() != "system":  # tcmalloc reuses blocks by size and gives them back on request
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    except (OSError, AttributeError):
        pass


def return_large_blocks_at_once() -> None:
    """Make glibc map every block above 128 KiB on its own and give it back when freed: on a CPU under a
    budget, for the trials and every training step (`allocate_for_training`). By default glibc raises
    that threshold to the largest block freed so far (up to 32 MiB), after which activations come from a
    heap that keeps freed pages: measured on the quickstart, the real steps then peaked 0.6 GiB above
    the trial step; with fixed thresholds, 0.3 GiB (the same as MALLOC_MMAP_THRESHOLD_=131072
    MALLOC_TRIM_THRESHOLD_=131072 in the environment).

    The price is time: every activation is a fresh mapping, faulted in and zeroed by the kernel. One
    checkpointed step of 4 x 450 tokens of the 135M model took 18.1 s against 12.9 s with glibc's
    defaults (peaks 3.36 and 4.39 GiB). Trimming the heap (malloc_trim) before every micro-batch instead
    kept the defaults' speed, but the real steps still peaked 0.6 GiB above their trial, over the
    budget: a budget that holds is worth the time here."""
    _set_glibc_thresholds(HEAP_THRESHOLD, HEAP_THRESHOLD)


def allocate_for_training() -> None:
    """Before a training step on a CPU under a budget: large blocks mapped on their own (above, glibc only),
    and the memory that generation, validation and the last step freed given back, so the step's peak
    is the trial's. Under tcmalloc (talr/allocator.py) only the second: the step then reuses its own
    freed blocks by size, where glibc's fixed threshold has every block mapped and zeroed afresh."""
    return_large_blocks_at_once()
    release_free_memory()


def allocate_for_inference() -> None:
    """Between training steps on a CPU under a budget (validation, generation, probes, export): blocks up
    to 32 MiB come from the heap and are reused, as glibc does by default once its threshold has risen.
    These phases hold no activations for a backward, so the budget is not at stake, and their many
    short-lived blocks are where fresh mappings cost most: greedy generation of 64 tokens after 8 prompts
    of 300 tokens (135M model, 2-core CPU) took 11 s this way against 17 s with every block mapped."""
    _set_glibc_thresholds(REUSE_THRESHOLD, 2 * REUSE_THRESHOLD)


class PeakMemory:
    """The peak memory of this process on `device` since `reset()`, and over its whole life.

    A reset forgets the peak so far, so the process-wide peak before each reset is kept in a
    class-level record (the process has one peak, whichever meter reset it)."""

    _peak_before_resets: dict[str, int] = {}

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._sampler: threading.Thread | None = None
        self._sampled = 0
        self._stop = threading.Event()

    @property
    def _key(self) -> str:
        return str(self.device) if self.device.type == "cuda" else "cpu"

    def current(self) -> int:
        """Memory held now: resident set on a CPU, allocated tensors on a GPU."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        rss = _vm_kib("VmRSS")
        if rss is not None:
            return rss * 1024
        import psutil

        return psutil.Process().memory_info().rss

    def _raw_peak(self) -> int:
        """The peak since the last reset (or since the process started)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        hwm = _vm_kib("VmHWM")
        if hwm is not None:
            return hwm * 1024
        if self._sampler is not None:
            return max(self._sampled, self.current())
        import resource  # macOS: ru_maxrss in bytes, never reset there (no sampler ran)

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def reset(self) -> None:
        """Start a new peak from the memory held now."""
        record = PeakMemory._peak_before_resets
        record[self._key] = max(record.get(self._key, 0), self._raw_peak())
        self.stop()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        release_free_memory()
        try:
            _PROC_CLEAR_REFS.write_text("5")  # Linux: resets VmHWM to the current resident set
            if _vm_kib("VmHWM") is not None:
                return
        except OSError:
            pass
        self._sampled = self.current()  # elsewhere: sample the resident set every millisecond
        self._stop.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, self.current())

    def stop(self) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampled = max(self._sampled, self.current())

    def peak(self) -> int:
        """The peak since `reset()`."""
        return self._raw_peak()

    def process_peak(self) -> int:
        """The peak over the process's life (on a GPU: of allocated tensors on this device)."""
        return max(PeakMemory._peak_before_resets.get(self._key, 0), self._raw_peak())


def process_peak_memory(device: torch.device | str) -> int:
    """The process's peak memory so far: resident set on a CPU, allocated tensors on a GPU."""
    return PeakMemory(device).process_peak()


# the levels `micro_batch_size: auto` tries, cheapest in time first, for each `model.gradient_checkpointing`:
# selective only where asked for, since on a CPU its trials cost more than it saves in short runs (the
# quickstart: 4 trial steps and 311 s against 2 and 296 s, benchmarks/RESULTS.md)
SEARCHED_LEVELS = {"off": ("off", "full"), "selective": ("off", "selective", "full"), "full": ("full",)}

# A checkpointed step under the budget also projects its target tokens onto the vocabulary this many at a
# time (talr.token_loss.ChunkedLinearNLL), unless model.loss_chunk_size is set or the loss needs all the
# logits: the quickstart's step then needs 0.34 GiB less (its [target tokens x vocabulary] logits, their
# softmax and gradient), with no measurable change in step time (benchmarks/RESULTS.md)
BUDGET_LOSS_CHUNK = 256


def loss_chunk_for(module: Any, checkpointing: str) -> int | None:
    """The loss chunk size that a step at `checkpointing` runs with under the budget."""
    chosen = module.hparams.loss_chunk_size
    if chosen or checkpointing == "off" or module.loss_fn.needs.logits:
        return chosen
    return BUDGET_LOSS_CHUNK


# -- choosing -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryChoice:
    micro_batch_size: int
    checkpointing: str  # a level of talr.models.CHECKPOINTING_LEVELS
    need_bytes: int  # the chosen setting's measured need (trial peak plus the optimizer's state)
    budget_bytes: int
    batch_size: int
    trials: int

    def describe(self) -> str:
        return (f"memory budget {gib(self.budget_bytes)}: micro-batch {self.micro_batch_size} of {self.batch_size} rows, "
                f"gradient checkpointing {self.checkpointing}; trial step peak "
                f"{gib(self.need_bytes)} (with the optimizer's state; {self.trials} trial steps)")


def largest_fitting(batch_size: int, budget: int, need: Callable[[int], int]) -> tuple[int | None, dict[int, int]]:
    """The largest micro-batch size in 1..batch_size whose `need` fits `budget` (None if 1 does not),
    and every size measured. `need` is taken to grow with the size; sizes are tried as the module
    docstring says, so a trial far above the budget is never run once a smaller size has been measured."""
    measured: dict[int, int] = {}

    def measure(size: int) -> int:
        measured[size] = need(size)
        return measured[size]

    if measure(1) > budget:
        return None, measured
    best, above = 1, batch_size + 1  # largest known to fit, smallest known not to
    if batch_size >= 2:
        if measure(2) <= budget:
            best = 2
        else:
            above = 2
    while best + 1 < above and len(measured) < MAX_TRIALS:
        if above <= batch_size:  # interpolate between the largest fitting and the smallest failing size
            lower, upper = best, above
        else:  # extrapolate from the two largest fitting sizes
            lower, upper = max(m for m in measured if m < best), best
        slope = (measured[upper] - measured[lower]) / (upper - lower)
        guess = batch_size if slope <= 0 else best + int((budget - measured[best]) // slope)
        size = min(max(guess, best + 1), above - 1)
        if measure(size) <= budget:
            best = size
        else:
            above = size
    return best, measured


def choose_memory_settings(batch_size: int, budget: int, need: Callable[[int, str], int],
                           checkpointing_options: tuple[str, ...] = CHECKPOINTING_LEVELS,
                           split_costs_a_forward: bool = False, fixed_bytes: int | None = None) -> MemoryChoice:
    """The largest micro-batch at the cheapest checkpointing level where any fits (`checkpointing_options`,
    cheapest in time first) whose `need(size, level)` in bytes fits `budget`; MemoryBudgetError naming
    the needs when nothing does. No setting is measured twice.

    `split_costs_a_forward`: the strategy needs the step's sequence losses before any backward (TALR's
    tau), so a step split into micro-batches pays a no-grad forward of every row first. Checkpointing
    the whole step as one micro-batch pays at most that forward (its recompute; less where selective)
    with larger matmuls and no split, so where that fits it is taken over a split step without
    checkpointing, at the cheapest level that fits.

    `fixed_bytes`: the part of every need that does not grow with the micro-batch (the process before
    the trials, the gradients, the optimizer's state). With it, a strategy of the kind above skips
    the trials of split steps when one row's trial shows that the whole step cannot fit without
    checkpointing (the other rows adding what the first added, over the budget by 10%): its choice
    is then the whole step checkpointed, or the search below when that does not fit at any level. A
    whole-step trial at `selective` is run only where a one-row trial at that level predicts a fit."""
    measured: dict[tuple[int, str], int] = {}

    def trial(size: int, level: str) -> int:
        if (size, level) not in measured:
            measured[size, level] = need(size, level)
        return measured[size, level]

    checkpointed = [level for level in checkpointing_options if level != "off"]

    def whole_step_from_one_row(level: str) -> float:
        """The whole step's need predicted from one row's trial: the other rows add what the first added."""
        one = trial(1, level)
        return one + (batch_size - 1) * (one - fixed_bytes)

    def whole_step_checkpointed() -> MemoryChoice | None:
        for level in checkpointed:
            if fixed_bytes is not None and level != checkpointed[-1] and batch_size > 1:
                # a level with a cheaper one after it: one row predicts the whole step first, and a
                # wrong prediction can only cost speed (the next level), never the budget
                if whole_step_from_one_row(level) > budget:
                    continue
            whole = trial(batch_size, level)
            if whole <= budget:
                return MemoryChoice(batch_size, level, whole, budget, batch_size, trials=len(measured))
        return None

    prefer_whole = split_costs_a_forward and "off" in checkpointing_options and bool(checkpointed)
    if prefer_whole and fixed_bytes is not None and batch_size > 1:
        if trial(1, "off") <= budget and whole_step_from_one_row("off") > 1.1 * budget:
            choice = whole_step_checkpointed()
            if choice is not None:
                return choice
    smallest = {}
    for level in checkpointing_options:
        size, sizes = largest_fitting(batch_size, budget, lambda m: trial(m, level))
        if size is not None and level == "off" and size < batch_size and prefer_whole:
            choice = whole_step_checkpointed()
            if choice is not None:
                return choice
        if size is not None:
            return MemoryChoice(size, level, sizes[size], budget, batch_size, trials=len(measured))
        smallest[level] = sizes
    tried = "; ".join(f"gradient checkpointing {level} {gib(m[1])}" for level, m in smallest.items())
    raise MemoryBudgetError(
        f"data.memory_budget {gib(budget)} is too small for one training step: micro-batch 1 of the longest rows "
        f"needs {tried} (measured with a trial step, the optimizer's state included). Raise data.memory_budget, "
        "lower data.max_length, or set model.loss_chunk_size")


# -- applying -------------------------------------------------------------------------------------------
def apply_memory_budget(module: Any, datamodule: Any) -> MemoryChoice | None:
    """Set `datamodule.micro_batch_size` and the model's gradient checkpointing for
    `datamodule.memory_budget` when the micro-batch size is `auto` (else do nothing, return None).

    `module` is an SFTModule with its model on its device (from `on_fit_start`): its `trial_step` runs
    one micro-batch through the training path. Every rank runs the same trials; each trial's need is
    the largest over ranks, and the budget is rank zero's, so all ranks choose the same."""
    if getattr(datamodule, "micro_batch_size", None) != "auto":
        if getattr(datamodule, "memory_budget", None) is not None:
            rank_zero_info(f"[talr] data.memory_budget {datamodule.memory_budget} not applied: data.micro_batch_size is "
                           f"fixed at {datamodule.micro_batch_size} (set it to auto to measure)")
        return None
    trainer, device = module.trainer, module.device
    if device.type == "cpu":
        return_large_blocks_at_once()  # before the trials, so they and the training allocate alike
    batch_size = min(int(datamodule.batch_size), len(datamodule.datasets["train"]))
    trainable = [p for p in module.net.parameters() if p.requires_grad]
    weight_bytes = sum(_local(p).numel() * p.element_size() for p in trainable)
    # AdamW's step temporaries: weight-sized on the foreach path, one tensor's worth on the per-tensor loop
    step_temporary = weight_bytes if adamw_foreach(device) is not False else max(
        (_local(p).numel() * p.element_size() for p in trainable), default=0)
    meter = PeakMemory(device)

    def largest_over_ranks(nbytes: int) -> int:
        return int(trainer.strategy.reduce(torch.tensor(float(nbytes), device=device), reduce_op="max").item())

    def need(size: int, level: str) -> int:
        set_gradient_checkpointing(module.lm, level)
        module.net.chunk_size = loss_chunk_for(module, level)
        micro = {k: v.to(device) for k, v in datamodule.longest_micro_batch(size).items()}
        meter.reset()
        module.trial_step(micro, in_a_larger_step=size < batch_size)
        after_backward = meter.current()
        peak = meter.peak()
        module.net.zero_grad(set_to_none=True)
        return largest_over_ranks(max(peak, after_backward + step_temporary) + 2 * weight_bytes)

    budget = int(trainer.strategy.broadcast(budget_bytes(datamodule.memory_budget, device), src=0))
    options = SEARCHED_LEVELS[checkpointing_level(module.hparams.gradient_checkpointing)]
    meter.reset()
    fixed = largest_over_ranks(meter.current() + 3 * weight_bytes)  # now, plus the gradients and AdamW's two moments
    choice = choose_memory_settings(batch_size, budget, need, options,
                                    split_costs_a_forward=module.loss_fn.needs.step_losses, fixed_bytes=fixed)
    set_gradient_checkpointing(module.lm, choice.checkpointing)
    module.net.chunk_size = loss_chunk_for(module, choice.checkpointing)
    datamodule.micro_batch_size = choice.micro_batch_size
    meter.reset()  # the trials' leftovers are not the training's
    if device.type == "cpu":
        allocate_for_inference()  # until the first training step (SFTModule.on_train_batch_start)
    chunk = f"; loss projected {module.net.chunk_size} target tokens at a time" if module.net.chunk_size else ""
    allocator = f"; allocator {current_allocator()}" if device.type == "cpu" else ""
    rank_zero_info(f"[talr] {choice.describe()}{chunk}{allocator}")
    return choice


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (a DTensor); the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
