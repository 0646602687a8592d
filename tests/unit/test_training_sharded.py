"""Fully sharded training (FSDP2) with two CPU processes (gloo) under torchrun, as SageMaker's
torch_distributed starts them: the same train.py, a sharded checkpoint, a resume after a kill, and the
model one unsharded process trains.

The base is a tiny BERT without dropout, so the two runs draw nothing at random that could tell them apart:
what differs is only how the processes hold the model and sum the gradients.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from test_training import TRAINING, TrainedCase, serve, served, split_rows
from test_training_pretrained import WORDS, pretrained_job, sentiment
from tiny_models import save_tiny_encoder

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
fully_shard = pytest.importorskip("torch.distributed.fsdp").__dict__.get("fully_shard")
if fully_shard is None:
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)", allow_module_level=True)

SETTINGS = (
    *("--epochs", "4", "--patience", "4", "--learning_rate", "1e-2", "--batch_size", "16"),
    *("--lr_schedule", "plateau", "--checkpoint_steps", "7"),
)
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def run(command, env, root):
    completed = subprocess.run(
        command, env={**env, "OMP_NUM_THREADS": "1"}, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return completed


def evaluation(root):
    return json.loads((root / "opt/ml/model/evaluation.json").read_text())


def history(root):
    return json.loads((root / "opt/ml/output/data/history.json").read_text())


def job(tmp_path, name, rows, manifest, base, *extra, processes=1, family="bert"):
    root = tmp_path / name
    root.mkdir()
    command, env, _ = pretrained_job(root, rows, manifest, family, *SETTINGS, *extra, base=base)
    assert command[:2] == [sys.executable, str(TRAINING / "train.py")]
    return root, ([*TORCHRUN, *command[1:]] if processes == 2 else command), env


def test_two_processes_train_shards_checkpoint_resume_and_match_the_unsharded_model(tmp_path):
    rows, manifest = sentiment(n=400)
    base = save_tiny_encoder(tmp_path / "base", "bert", words=WORDS, dropout=0.0)
    one_root, command, env = job(tmp_path, "one", rows, manifest, base, "--sharding", "none")
    run(command, env, one_root)
    ddp_root, command, env = job(tmp_path, "ddp", rows, manifest, base, "--sharding", "none", processes=2)
    run(command, env, ddp_root)

    # Two processes, sharded; killed (the whole torchrun group, as a spot interruption) in epoch 2 of 4,
    # then started again. 320 training rows in batches of 16: checkpoints every 7 steps and at epochs' ends.
    root, command, env = job(tmp_path, "fsdp", rows, manifest, base, "--sharding", "fsdp", processes=2)
    started = subprocess.Popen(
        command,
        env={**env, "OMP_NUM_THREADS": "1"},
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in started.stdout:
        seen.append(line)
        if line.startswith("epoch=2 "):  # past the checkpoints of epoch 1 and those in epoch 2
            break
    assert started.poll() is None, "the job ended before it could be interrupted:\n" + "".join(seen)[-4000:]
    os.killpg(started.pid, signal.SIGKILL)
    started.wait(timeout=60)
    started.stdout.close()
    text = "".join(seen)
    # BERT's embeddings and its two layers one by one, then the classifier head with the root.
    assert text.count("FSDP: 3 sharded units and the root over 2 processes") == 1, text[-4000:]
    store = next((root / "checkpoints").glob("checkpoint-*/"))
    latest = store / (store / "latest").read_text().strip()
    # Every process's shard, the metadata, and the host's state; older checkpoints are gone (a newer one
    # may be half-written: the kill can come while it is saved; `latest` names it only once it is whole).
    assert {p.name for p in latest.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.pt"}
    assert all(p.name >= latest.name for p in store.glob("step-*"))
    assert not (root / "opt/ml/model/evaluation.json").exists()

    again = run(command, env, root)
    assert "resuming from the checkpoint: epoch " in again.stdout + again.stderr
    assert "epoch=1 " not in again.stdout, "it started over"
    assert again.stdout.count("test_accuracy=") == 1, "only the main process reports and saves"

    # The sharded, interrupted run trains what the same two processes train unsharded (DDP), within the
    # float error of summing gradients in another order: epoch by epoch, up to the epoch both keep.
    sharded, unsharded = evaluation(root)["conveyor"], evaluation(ddp_root)["conveyor"]
    assert sharded["best_epoch"] == unsharded["best_epoch"] >= 1, (sharded, unsharded)
    kept = sharded["best_epoch"]
    for mine, theirs in zip(history(root)[: kept + 1], history(ddp_root)[: kept + 1], strict=True):
        for name in ("train_loss", "validation_loss"):
            if name in theirs:
                assert mine[name] == pytest.approx(theirs[name], rel=2e-3), (name, mine, theirs)
    assert sharded["value"] == pytest.approx(unsharded["value"], abs=0.03)
    # And as well as one process (whose half as many, twice as long batches round differently).
    assert sharded["value"] == pytest.approx(evaluation(one_root)["conveyor"]["value"], abs=0.05)
    assert sharded["value"] > sharded["baseline"] + 0.3
    assert sharded["hyperparameters"]["sharding"] == "fsdp"

    # It serves like any other model: the model directory holds the whole, unsharded model.
    case = TrainedCase(root, {"test": root / "input/test"}, manifest, again)
    test_rows = split_rows(case.channels, "test")
    with served(case) as (inference, model):
        instances = [{k: v for k, v in row.items() if k != "sentiment"} for row in test_rows]
        labels = [p["label"] for p in serve(inference, model, instances)["predictions"]]
    accuracy = sum(label == row["sentiment"] for label, row in zip(labels, test_rows, strict=True))
    assert accuracy / len(test_rows) == pytest.approx(sharded["value"])


def test_lora_adapters_train_sharded_and_save_merged(tmp_path):
    """LoRA under FSDP: the frozen base and the adapters are sharded alike (DistilBERT names no
    `_no_split_modules`; its layers are found as transformers' GradientCheckpointingLayer)."""
    rows, manifest = sentiment(n=400)
    base = save_tiny_encoder(tmp_path / "base", "distilbert", words=WORDS, dropout=0.0)
    root, command, env = job(
        tmp_path, "lora", rows, manifest, base, *("--sharding", "fsdp", "--adapter", "lora"), processes=2,
        family="distilbert",
    )  # fmt: skip
    completed = run(command, env, root)
    assert "FSDP: 2 sharded units and the root over 2 processes" in completed.stdout + completed.stderr
    model_dir = root / "opt/ml/model"
    assert (model_dir / "adapter").is_dir() and (model_dir / "hf/model.safetensors").is_file()
    architecture = json.loads((model_dir / "model_config.json").read_text())["architecture"]
    assert architecture["adapter"] == "lora" and architecture["model_type"] == "distilbert"
