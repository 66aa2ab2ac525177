"""W&B for real, offline: the run directory wandb writes is inspected, nothing is mocked."""
import json
import struct
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, run_train

METRIC_KEYS = ["train/loss", "val/loss", "lr", "grad_norm", "time/elapsed_s", "throughput/tokens_per_s", "mfu",
               "optim/win_rate", "optim/clip_rate", "optim/hessian_norm", "tokens"]


def offline_runs(out_dir):
    return sorted((out_dir / "wandb").glob("offline-run-*"))


def wandb_records(path):
    """The records of a .wandb file, W&B's transaction log: a 7-byte header (":W&B", 0xBEE1, version 0), then
    LevelDB's log format (32 KiB blocks of chunks: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4), each
    record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2
    data = Path(path).read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), path
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break  # zero-filled: the end of what was written
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_run(run_dir):
    """(the run record: id, group, tags..., {step: {key: value}} of the logged history) of one offline run."""
    [path] = run_dir.glob("run-*.wandb")
    run, history = None, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
    return run, history


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare_bins")
def test_offline_run_logs_every_metric_and_a_resumed_job_continues_the_same_run(tmp_path):
    """The run's group and tags, and every value of metrics.jsonl, as W&B recorded them; a resumed job continues
    the same W&B run (the id kept in the checkpoint) with the same group and tags."""
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline"}
    args = ["optim=sophiag", "optim.hess_interval=2", "wandb.enabled=true", "wandb.group=group_of_the_test",
            "wandb.tags=[tag_of_the_test]", "lr_decay_steps=4"]
    run_train(args + ["max_steps=2"], out, env=env)
    run_id = torch.load(out / "ckpt.pt", weights_only=False)["wandb_run_id"]
    [first] = offline_runs(out)
    assert first.name.endswith(run_id)

    run_train(args + ["max_steps=4"], out, env=env)  # the requeued job
    runs = offline_runs(out)
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    logged = {}
    for run_dir in runs:
        run, history = read_offline_run(run_dir)
        assert run.run_id == run_id
        assert run.run_group == "group_of_the_test"
        # the optimizer, the model and the data, then wandb.tags
        assert list(run.tags) == ["sophiag", "tiny", "shakespeare", "tag_of_the_test"]
        logged.update(history)

    metrics = read_metrics(out)
    assert [r["step"] for r in metrics if "train/loss" in r] == [1, 2, 3, 4]
    assert set(METRIC_KEYS) <= {key for r in metrics for key in r}
    expected = {}  # W&B keeps one row per step: a key logged twice at a step (the evaluation's time) keeps the last
    for record in metrics:
        expected.setdefault(record["step"], {}).update(record)
    for step, row in expected.items():
        for key, value in row.items():
            assert key == "step" or logged[step][key] == pytest.approx(value, rel=1e-12, abs=0), (step, key)


@pytest.mark.usefixtures("shakespeare_bins")
def test_wandb_without_login_warns_and_training_goes_on(tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path),
           "WANDB_CONFIG_DIR": str(tmp_path / "cfg"), "WANDB_BASE_URL": "http://127.0.0.1:9"}
    result = run_train(["optim=adamw", "max_steps=2", "wandb.enabled=true"], tmp_path / "run", env=env)
    assert "warning: W&B could not start" in result.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r] == [1, 2]
