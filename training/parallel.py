"""How the training processes share a model: each holds all of it (one process, or DistributedDataParallel
under torchrun), or each holds a shard of it (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``) when
its weights, gradients and optimiser state do not fit one device.

`fit` sees one interface, `Parallel`: wrap the network, sync gradients on the last micro-batch, copy and
load the best weights, save and resume checkpoints, gather the weights to save. Sharded, every process
takes part in each of these (they are collectives); its checkpoint is a `torch.distributed.checkpoint`
directory of every process's shard, so a job that loses an instance resumes with the others' shards too.

Which one trains is the ``sharding`` hyperparameter: ``none``, ``fsdp``, or ``auto`` (the default): FSDP
when there are several processes on GPUs and fine-tuning the network needs more than `USABLE_SHARE` of
one device's memory (the preprocess function's estimate asks for ``fsdp`` explicitly when the base model
it checked does not fit one device of the instance it chose).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import distributed, nn
from torch.nn.parallel import DistributedDataParallel

from checkpoint import Checkpoints

log = logging.getLogger("train")

SHARDING = ("auto", "none", "fsdp")
# Bytes per trained parameter with AdamW in float32 (weights, gradients, two moments); frozen ones: weights.
# The same figures as the preprocess function's estimate (functions/common/instances.py), which the training
# container does not ship: this one counts the network's own parameters instead of a base's header.
TRAINED_BYTES, FROZEN_BYTES = 16, 4
# The share of a device's memory the weights, gradients and optimiser state may take; activations need the rest.
USABLE_SHARE = 0.8


def training_bytes(network: nn.Module) -> int:
    """Memory that training `network` takes for its weights, gradients and optimiser state."""
    return sum(p.numel() * (TRAINED_BYTES if p.requires_grad else FROZEN_BYTES) for p in network.parameters())


def choose(setting: str, network: nn.Module, rank: int, world_size: int, device: torch.device) -> Parallel:
    """The `Parallel` for the ``sharding`` hyperparameter (see the module's docstring)."""
    if setting not in SHARDING:
        raise ValueError(f"sharding {setting!r}: use one of {', '.join(SHARDING)}")
    if world_size == 1:
        if setting == "fsdp":
            log.info("sharding fsdp: one training process, so nothing to shard; training unsharded")
        return Replicated(rank, world_size)
    if setting == "auto":
        needed = training_bytes(network)
        room = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        setting = "fsdp" if room is not None and needed > room * USABLE_SHARE else "none"
        if setting == "fsdp":
            log.info(
                "sharding the model over %d processes (FSDP): training it needs about %.1f GiB, more than "
                "%.0f%% of one device's %.1f GiB",
                world_size,
                needed / 2**30,
                USABLE_SHARE * 100,
                room / 2**30,  # type: ignore[operator]
            )
    return FullySharded(rank, world_size) if setting == "fsdp" else Replicated(rank, world_size)


class Parallel:
    """One process's part in training the network (see the module's docstring)."""

    sharded = False

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, network: nn.Module, device: torch.device) -> nn.Module:
        """What the training steps call (the network itself, or its wrapper)."""
        raise NotImplementedError

    def sync(self, model: nn.Module, last: bool) -> Any:
        """A context for one micro-batch's backward: gradients are synced on the batch's last one only."""
        raise NotImplementedError

    def weights(self, network: nn.Module) -> dict[str, Any]:
        """A copy of the weights on the host (this process's shard of them, sharded)."""
        raise NotImplementedError

    def load_weights(self, network: nn.Module, weights: dict[str, Any]) -> None:
        raise NotImplementedError

    def save_checkpoint(
        self,
        checkpoints: Checkpoints,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        best: dict[str, Any],
        host: dict[str, Any],
    ) -> None:
        """Save the training state: the weights, the optimiser's, the best weights and the host's state (the
        schedule, the position in the epoch, random state: the same in every process)."""
        raise NotImplementedError

    def load_checkpoint(
        self, checkpoints: Checkpoints, network: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        """Load the saved training state into `network` and `optimizer`; the host's state, with the best
        weights as ``best_state``; None when there is none."""
        raise NotImplementedError

    def full_weights(self, network: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole network's weights on the host for the main process to save, None in the others."""
        raise NotImplementedError


class Replicated(Parallel):
    """Every process holds the whole model: one process, or DistributedDataParallel averaging gradients."""

    def wrap(self, network: nn.Module, device: torch.device) -> nn.Module:
        if self.world_size == 1:
            return network
        return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)

    def sync(self, model: nn.Module, last: bool) -> Any:
        return nullcontext() if last or self.world_size == 1 else model.no_sync()  # type: ignore[operator]

    def weights(self, network: nn.Module) -> dict[str, Any]:
        # On the host: a large model's best weights need not take a second copy's worth of GPU memory.
        return {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}

    def load_weights(self, network: nn.Module, weights: dict[str, Any]) -> None:
        network.load_state_dict(weights)

    def save_checkpoint(
        self,
        checkpoints: Checkpoints,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        best: dict[str, Any],
        host: dict[str, Any],
    ) -> None:
        if self.main:  # every process holds the same state
            checkpoints.save(
                {
                    "network": network.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "best_state": best,
                    **host,
                }
            )

    def load_checkpoint(
        self, checkpoints: Checkpoints, network: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        saved = checkpoints.load()
        if saved is not None:
            network.load_state_dict(saved["network"])
            optimizer.load_state_dict(saved["optimizer"])
        return saved

    def full_weights(self, network: nn.Module) -> dict[str, torch.Tensor] | None:
        return network.state_dict() if self.main else None


class FullySharded(Parallel):
    """Each process holds 1/world_size of every weight, gradient and optimiser moment (FSDP2): a layer's
    weights are gathered for its forward and backward, and its gradients reduce-scattered after."""

    sharded = True

    def wrap(self, network: nn.Module, device: torch.device) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (self.world_size,))
        units = shard_units(network)
        # Layer by layer, then the rest (embeddings, head) at the root: a layer's weights are gathered only
        # while it runs, and each moves to the device as its shard, so the whole model is never on one.
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(network, mesh=mesh)
        if self.main:
            log.info("FSDP: %d sharded units and the root over %d processes", len(units), self.world_size)
        return network

    def sync(self, model: nn.Module, last: bool) -> Any:
        return _gradient_sync(model, last)

    def weights(self, network: nn.Module) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(network, options=StateDictOptions(cpu_offload=True))
        return {k: v.clone() for k, v in state.items()}

    def load_weights(self, network: nn.Module, weights: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(network, weights)

    def save_checkpoint(
        self,
        checkpoints: Checkpoints,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        best: dict[str, Any],
        host: dict[str, Any],
    ) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        sharded = {
            "network": get_model_state_dict(network),
            "optimizer": get_optimizer_state_dict(network, optimizer),
            **({"best": best} if best else {}),
        }
        ShardedCheckpoint(checkpoints, self.rank).save(sharded, {**host, "has_best": bool(best)})

    def load_checkpoint(
        self, checkpoints: Checkpoints, network: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not checkpoints.enabled:
            return None
        store = ShardedCheckpoint(checkpoints, self.rank)
        host = store.host()
        if host is None:
            return None
        # Loaded in place into tensors of the shapes and shards the checkpoint holds.
        sharded = {
            "network": get_model_state_dict(network),
            "optimizer": get_optimizer_state_dict(network, optimizer),
            **({"best": self.weights(network)} if host["has_best"] else {}),
        }
        store.load(sharded)
        set_model_state_dict(network, sharded["network"])
        set_optimizer_state_dict(network, optimizer, sharded["optimizer"])
        return {**host, "best_state": sharded.get("best", {})}

    def full_weights(self, network: nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.main else None


def is_sharded(network: nn.Module) -> bool:
    """Whether `network` is FSDP-sharded (`FullySharded.wrap`)."""
    return callable(getattr(network, "set_requires_gradient_sync", None))


def shard_units(network: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one, innermost first (FSDP wants a unit's inner units sharded before it):
    the network's own ``shard_units`` when it has them; else a transformers model's layers: the classes its
    ``_no_split_modules`` names, and every ``GradientCheckpointingLayer`` (what transformers 5 makes each
    layer block of an encoder, DistilBERT's included, which names no ``_no_split_modules``). None otherwise:
    the network is then one unit."""
    own = getattr(network, "shard_units", None)
    if callable(own):
        return list(own())
    names: set[str] = set()
    for module in network.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())

    def is_unit(module: nn.Module) -> bool:
        classes = {c.__name__ for c in type(module).__mro__}
        return bool(classes & names) or "GradientCheckpointingLayer" in classes

    return [m for m in reversed(list(network.modules())) if m is not network and is_unit(m)]


@contextmanager
def _gradient_sync(model: nn.Module, last: bool) -> Iterator[None]:
    if last:
        yield
        return
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


class ShardedCheckpoint:
    """A sharded training state on disk: ``checkpoint-<fingerprint>/step-N/`` holds every process's shard
    (`torch.distributed.checkpoint`) and ``trainer.pt``, the host's state; ``latest`` names the newest
    complete one. A step directory is named in ``latest`` only once every process has written its shard, so
    a job killed while saving resumes from the one before; older ones are removed after."""

    def __init__(self, checkpoints: Checkpoints, rank: int) -> None:
        if checkpoints.path is None:
            raise ValueError("no checkpoint directory")
        self.root = checkpoints.path.with_suffix("")
        self.fingerprint = checkpoints.fingerprint
        self.rank = rank

    def _latest(self) -> Path | None:
        pointer = self.root / "latest"
        return self.root / pointer.read_text().strip() if pointer.exists() else None

    def save(self, sharded: dict[str, Any], host: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        # Named by the optimizer step, which every process knows: no process reads another one's files.
        target = self.root / f"step-{host['step_count']:08d}-{host['epoch']:05d}"
        dcp.save(sharded, checkpoint_id=target)  # every process writes its shard; the first, the metadata
        if self.rank == 0:
            torch.save({**host, "fingerprint": self.fingerprint}, target / "trainer.pt")
        distributed.barrier()
        if self.rank == 0:
            partial = self.root / "latest.partial"
            partial.write_text(target.name + "\n")
            partial.replace(self.root / "latest")
        distributed.barrier()
        for old in self.root.glob("step-*"):  # each machine its own copies (SageMaker syncs them to S3)
            if old.name != target.name:
                shutil.rmtree(old, ignore_errors=True)

    def host(self) -> dict[str, Any] | None:
        """The host's state of the newest complete checkpoint of this training, or None."""
        latest = self._latest()
        if latest is None or not (latest / "trainer.pt").exists():
            return None
        state = torch.load(latest / "trainer.pt", map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring %s: it belongs to another training", latest)
            return None
        return state

    def load(self, sharded: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load(sharded, checkpoint_id=self._latest())
