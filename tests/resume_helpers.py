"""A callback for the resume test, importable by `talr fit` in a subprocess."""

import lightning as L


class PrintRows(L.Callback):
    """Prints which rows each optimizer step trains on."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = sorted(int(i) for m in batch["micro_batches"] for i in m["row_index"])
        print(f"ROWS epoch {trainer.current_epoch} batch {batch_idx} step {trainer.global_step}: {rows}", flush=True)
