"""Callbacks for the crash and resume tests, importable by `talr fit` in a subprocess.

The kill switches read environment variables so that one config serves the killed run and the
resumed run (which does not set them).
"""

import io
import os
import signal

import lightning as L
import torch


class PrintRows(L.Callback):
    """Prints which rows each optimizer step trains on."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = sorted(int(i) for m in batch["micro_batches"] for i in m["row_index"])
        print(f"ROWS epoch {trainer.current_epoch} batch {batch_idx} step {trainer.global_step}: {rows}", flush=True)


class KillSwitch(L.Callback):
    """SIGKILL, as a cluster's OOM killer or preemption would: no exception handler, no cleanup.

    TALR_TEST_KILL_AT_STEP=n kills the process between optimizer steps, before step n runs.
    TALR_TEST_KILL_IN_WRITE=n kills it halfway through writing the n-th checkpoint file.
    """

    def setup(self, trainer, pl_module, stage):
        write = int(os.environ.get("TALR_TEST_KILL_IN_WRITE", 0))
        if write:
            import talr.checkpoint_io as checkpoint_io

            real_save, calls = checkpoint_io.torch.save, [0]

            def save_then_die_midway(obj, f):
                calls[0] += 1
                if calls[0] < write:
                    return real_save(obj, f)
                buffer = io.BytesIO()
                real_save(obj, buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

            checkpoint_io.torch = _TorchWithSave(save_then_die_midway)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == int(os.environ.get("TALR_TEST_KILL_AT_STEP", -1)):
            os.kill(os.getpid(), signal.SIGKILL)


class _TorchWithSave:
    """`torch` as seen by talr.checkpoint_io, with `save` replaced."""

    def __init__(self, save):
        self.save = save

    def __getattr__(self, name):
        return getattr(torch, name)
