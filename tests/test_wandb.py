"""W&B for real, offline: the run directory wandb writes is inspected, nothing is mocked."""
import pytest
import torch

from conftest import read_metrics, run_train

METRIC_KEYS = [b"train/loss", b"val/loss", b"lr", b"grad_norm", b"time/elapsed_s", b"throughput/tokens_per_s",
               b"mfu", b"optim/win_rate", b"optim/clip_rate", b"optim/hessian_norm", b"tokens"]


def offline_runs(out_dir):
    return sorted((out_dir / "wandb").glob("offline-run-*"))


@pytest.mark.usefixtures("shakespeare_bins")
def test_offline_run_logs_every_metric_and_a_resumed_job_continues_the_same_run(tmp_path):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline"}
    args = ["optim=sophiag", "optim.hess_interval=2", "wandb.enabled=true", "wandb.tags=[test]",
            "lr_decay_steps=4"]
    run_train(args + ["max_steps=2"], out, env=env)
    run_id = torch.load(out / "ckpt.pt", weights_only=False)["wandb_run_id"]
    [first] = offline_runs(out)
    assert first.name.endswith(run_id)
    record = next(first.glob("run-*.wandb")).read_bytes()
    for key in METRIC_KEYS + [b"shakespeare", b"sophiag", b"test"]:  # metrics, group, tags
        assert key in record, key

    run_train(args + ["max_steps=4"], out, env=env)  # the requeued job
    runs = offline_runs(out)
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    assert [r["step"] for r in read_metrics(out) if "train/loss" in r] == [1, 2, 3, 4]


@pytest.mark.usefixtures("shakespeare_bins")
def test_wandb_without_login_warns_and_training_goes_on(tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path),
           "WANDB_CONFIG_DIR": str(tmp_path / "cfg"), "WANDB_BASE_URL": "http://127.0.0.1:9"}
    result = run_train(["optim=adamw", "max_steps=2", "wandb.enabled=true"], tmp_path / "run", env=env)
    assert "warning: W&B could not start" in result.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r] == [1, 2]
