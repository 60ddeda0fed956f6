"""callbacks.token_probabilities.TokenProbabilityLogger on `talr fit` with a tiny random Llama
(real SmolLM2 tokenizer): the records against a plain Hugging Face forward, the logged numbers
against numpy, TALR's weights against the formula, resume, the no-overwrite rule, the notebook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from callbacks.token_probabilities import TokenProbabilityLogger
from cli import build_cli
from conftest import tiny_fit_config

REPO = Path(__file__).resolve().parents[1]
W_MIN = 0.36  # near exp(-1), the weight of a token whose loss equals tau: the random model's tokens fall on both sides
CALLBACK = "callbacks.token_probabilities.TokenProbabilityLogger"


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def fit(tiny_model_dir, out: Path, logger_options: dict, *extra: str, version: str = "run", checkpoints: bool = True):
    """`talr fit` from a standalone config (list keys such as callbacks merge item by item across
    several --config files): 12 training rows, 4 per step, so 3 optimizer steps."""
    callbacks = [{"class_path": CALLBACK, "init_args": logger_options}]
    if checkpoints:
        callbacks.insert(0, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(out / "checkpoints"), "every_n_train_steps": 1,
                                           "save_top_k": -1, "save_last": True}})
    config = tiny_fit_config(
        tiny_model_dir, out, version, callbacks, validate_before_fit=False, trainer={"limit_val_batches": 0},
        model={"loss": {"class_path": "talr.losses.TALR", "init_args": {"w_min": W_MIN}}, "learning_rate": 1e-2},
    )
    return build_cli(["fit", "--config", str(config), *extra])


def token_logger(cli) -> TokenProbabilityLogger:
    return next(c for c in cli.trainer.callbacks if isinstance(c, TokenProbabilityLogger))


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("token-probs")
    cli = fit(tiny_model_dir, out, {"num_examples": 3, "seed": 1, "every_n_steps": 1})
    return cli, out


def read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def test_a_file_per_logging_event_with_the_records(run):
    cli, _ = run
    callback = token_logger(cli)
    token_dir = Path(cli.trainer.log_dir) / "token_probs"
    assert sorted(p.name for p in token_dir.glob("*.parquet")) == [f"step_{s:06d}.parquet" for s in range(4)]
    assert callback.logged_steps == [0, 1, 2, 3] and len(callback.probe_rows) == 3
    records = read(token_dir / "step_000002.parquet")
    assert list(records.columns) == ["row_index", "position", "token_id", "token_text", "probability", "nll",
                                     "talr_weight", "step"]
    assert set(records.row_index) == set(callback.probe_rows) and (records.step == 2).all()
    examples = {e.row_index: e for e in cli.datamodule.datasets["train"].examples}
    assert len(records) == sum(examples[r].num_targets for r in callback.probe_rows)  # every target token, once
    first = examples[callback.probe_rows[0]]
    rows = records[records.row_index == first.row_index]
    assert rows.position.tolist() == list(range(first.prompt_len, len(first.input_ids)))
    assert rows.token_id.tolist() == first.input_ids[first.prompt_len:]
    assert rows.token_text.tolist() == [cli.model.tokenizer.decode([t]) for t in rows.token_id]


def plain_probabilities(lm, input_ids: list[int], positions: list[int]) -> np.ndarray:
    """exp(-cross-entropy) of each token at `positions` from a plain forward with full logits."""
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0].double()
    predicting = torch.tensor(positions) - 1
    ce = F.cross_entropy(logits[predicting], ids[0, positions], reduction="none")
    return torch.exp(-ce).numpy()


def test_probabilities_equal_a_plain_hugging_face_forward(run, tiny_model_dir):
    cli, _ = run
    token_dir = Path(cli.trainer.log_dir) / "token_probs"
    examples = {e.row_index: e for e in cli.datamodule.datasets["train"].examples}
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    final = cli.model.lm.eval()  # the weights after the last step, which step_000003 scored
    for step, lm in ((0, initial), (3, final)):
        records = read(token_dir / f"step_{step:06d}.parquet")
        for row in token_logger(cli).probe_rows:
            mine = records[records.row_index == row]
            expected = plain_probabilities(lm, examples[row].input_ids, mine.position.tolist())
            np.testing.assert_allclose(mine.probability.to_numpy(), expected, rtol=2e-5, atol=1e-7)
    # training moved the probabilities (so the two checks above are not the same check)
    before, after = read(token_dir / "step_000000.parquet"), read(token_dir / "step_000003.parquet")
    assert not np.allclose(before.probability, after.probability)


def test_talr_weights_follow_the_formula(run):
    cli, _ = run
    weights = []
    for path in sorted((Path(cli.trainer.log_dir) / "token_probs").glob("*.parquet")):
        records = read(path)
        weights.append(records.talr_weight.to_numpy())
        nll = -np.log(records.probability.to_numpy(np.float64))
        tau = np.median(pd.Series(nll).groupby(records.row_index.to_numpy()).mean())  # median of the rows' mean losses
        expected = np.maximum(np.exp(-nll / tau), W_MIN)
        np.testing.assert_allclose(records.talr_weight.to_numpy(np.float64), expected, rtol=1e-4)
    weights = np.concatenate(weights)  # the check covered tokens on both sides of the floor
    assert (weights == np.float32(W_MIN)).any() and (weights > W_MIN).any()


def test_tensorboard_has_the_histograms_and_numpy_equal_scalars(run):
    cli, _ = run
    log_dir = Path(cli.trainer.log_dir)
    events = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    assert {"token_probs/probability", "token_probs/talr_weight"} <= set(events.Tags()["histograms"])
    assert [e.step for e in events.Histograms("token_probs/probability")] == [0, 1, 2, 3]
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    for step in range(4):
        records = read(log_dir / "token_probs" / f"step_{step:06d}.parquet")
        probs, weights = records.probability.to_numpy(), records.talr_weight.to_numpy()
        histogram = events.Histograms("token_probs/probability")[step].histogram_value
        assert histogram.num == len(probs)
        for q in (10, 25, 50, 75, 90):
            assert scalars[f"token_probs/p{q}"][step] == pytest.approx(np.quantile(probs, q / 100), rel=1e-5)
        assert scalars["token_probs/mean"][step] == pytest.approx(probs.mean(), rel=1e-5)
        assert scalars["token_probs/share_above_0.2"][step] == pytest.approx((probs > 0.2).mean())
        assert scalars["token_probs/talr_weight_mean"][step] == pytest.approx(weights.mean(), rel=1e-5)
        assert scalars["token_probs/talr_cutoff_share"][step] == pytest.approx((weights <= np.float32(W_MIN)).mean())


def test_resume_keeps_the_probe_rows_and_continues_the_series(run, tiny_model_dir):
    cli, out = run
    first = token_logger(cli)
    resumed = fit(tiny_model_dir, out, {"num_examples": 3, "seed": 1, "every_n_steps": 1}, "--ckpt_path",
                  str(out / "checkpoints" / "epoch=0-step=1.ckpt"), version="resumed", checkpoints=False)
    callback = token_logger(resumed)
    assert callback.restored and callback.probe_rows == first.probe_rows
    assert callback.logged_steps == [0, 1, 2, 3]  # steps 0 and 1 came from the checkpoint
    new_dir = Path(resumed.trainer.log_dir) / "token_probs"
    assert sorted(p.name for p in new_dir.glob("*.parquet")) == ["step_000002.parquet", "step_000003.parquet"]
    original = read(Path(cli.trainer.log_dir) / "token_probs" / "step_000003.parquet")
    np.testing.assert_allclose(read(new_dir / "step_000003.parquet").probability, original.probability, rtol=1e-6)


def test_state_dict_round_trip():
    callback = TokenProbabilityLogger(num_examples=2)
    callback.probe_rows, callback.logged_steps, callback.files = [3, 7], [0, 5], ["a/step_000000.parquet"]
    restored = TokenProbabilityLogger(num_examples=2)
    restored.load_state_dict(callback.state_dict())
    assert restored.state_dict() == callback.state_dict() and restored.restored
    assert restored.state_key == callback.state_key != TokenProbabilityLogger(num_examples=3).state_key


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="num_examples must be at least 1"):
        TokenProbabilityLogger(num_examples=0)
    with pytest.raises(ValueError, match="every_n_steps must be at least 1"):
        TokenProbabilityLogger(every_n_steps=0)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        TokenProbabilityLogger(threshold=1.5)
    with pytest.raises(TypeError, match="talr must be a talr.losses.TALR"):
        TokenProbabilityLogger(talr={"w_min": 0.1})


def test_notebook_executes_on_a_run(run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    cli, _ = run
    monkeypatch.setenv("TALR_RUN_DIR", str(cli.trainer.log_dir))
    notebook = nbformat.read(REPO / "notebooks" / "token_probabilities.ipynb", as_version=4)
    assert not [c for c in notebook.cells if c.cell_type == "code" and (c.outputs or c.execution_count)], \
        "commit the notebook without outputs"
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()  # in memory only
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3, "figures 3a, 3b and 3c were not drawn"


def test_a_fresh_run_refuses_to_overwrite_an_earlier_runs_files(run, tiny_model_dir):
    """Last in this file: it replaces the module run's files (the other tests read them first)."""
    cli, out = run
    options = {"num_examples": 2, "every_n_steps": 2}
    earlier = Path(cli.trainer.log_dir) / "token_probs" / "step_000000.parquet"
    with pytest.raises(FileExistsError, match=r"token_probs already hold\(s\) results of an earlier run; "
                                              r"set TokenProbabilityLogger.overwrite: true"):
        fit(tiny_model_dir, out, options, "--trainer.max_steps", "1", checkpoints=False)
    again = fit(tiny_model_dir, out, {**options, "overwrite": True}, "--trainer.max_steps", "1", checkpoints=False)
    assert Path(again.trainer.log_dir) == earlier.parent.parent and token_logger(again).logged_steps == [0]
    # the earlier run's four files are gone, not mixed into the new run's results
    assert sorted(p.name for p in earlier.parent.glob("*.parquet")) == ["step_000000.parquet"]
