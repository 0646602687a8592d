"""What fine-tuning a model of N parameters needs in memory, and which SageMaker training instances have it:
GiB per device and devices per instance type, the estimate of weights + gradients + optimiser state, and
the instance to choose when a dataset's spec names none (one GPU that holds the model, else the smallest
instance whose GPUs hold it sharded). Pure Python: the preprocess function runs it, and
``common.base_models.estimate_fit`` refuses with it a base that no instance holds.
"""

from __future__ import annotations

# Memory one training process may use, per SageMaker instance type: (GiB per accelerator, accelerators)
# for GPU instances (NVIDIA's figures for T4 16, A10G 24, L4 24, L40S 48, V100 16/32, A100 40/80, H100
# 80, H200 141), and (host GiB, 0) for CPU instances. A type not listed is not checked, and the check says so.
_GPU_FAMILIES = {"g4dn": 16, "g5": 24, "g6": 24, "g6e": 48, "p3": 16, "p3dn": 32, "p4d": 40, "p4de": 80,
                 "p5": 80, "p5e": 141, "p5en": 141}  # fmt: skip
_MULTI_GPU_SIZES = {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8, "8xlarge": 1, "16xlarge": 1}
_CPU_GIB = {"m5": 4, "m6i": 4, "m7i": 4, "c5": 2, "c6i": 2, "c7i": 2, "r5": 8, "r6i": 8, "t3": 4}
_VCPUS = {"medium": 2, "large": 2, "xlarge": 4, "2xlarge": 8, "4xlarge": 16, "8xlarge": 32, "9xlarge": 36,
          "12xlarge": 48, "16xlarge": 64, "18xlarge": 72, "24xlarge": 96, "48xlarge": 192}  # fmt: skip
# Bytes per parameter in training with AdamW in float32: weights 4, gradients 4, two moments 8. Mixed
# precision keeps float32 master weights, so it saves activations, not these.
FULL_BYTES_PER_PARAMETER = 16  # training/parallel.py's TRAINED_BYTES, for the network a job builds
# With LoRA the base is frozen (weights only); adapters of rank 8 on the attention projections train
# under 2% of the parameters of the encoders conveyor fine-tunes.
LORA_TRAINED_SHARE = 0.02
# Activations, the CUDA context and fragmentation: a model is said to fit when its estimate is at most
# this share of one accelerator's memory.
USABLE_SHARE = 0.8
# The instance a refusal suggests: the smallest single-GPU memory that holds the estimate.
ONE_DEVICE_SUGGESTIONS = (("ml.g5.xlarge", 24), ("ml.g6e.xlarge", 48), ("ml.p4de.24xlarge", 80),
                           ("ml.p5e.48xlarge", 141))  # fmt: skip
# For a model no single GPU holds: the instances whose GPUs hold it together, sharded (FSDP), smallest first.
SHARDED_SUGGESTIONS = ("ml.g5.12xlarge", "ml.g6e.12xlarge", "ml.p4de.24xlarge", "ml.p5e.48xlarge")


def instance_memory(instance_type: str | None) -> tuple[float, int] | None:
    """(GiB of one training device, GPUs) for a SageMaker instance type; GPUs 0 for a CPU instance.

    None for a type this table does not know (its memory is then not checked).
    """
    if not instance_type:
        return None
    parts = instance_type.split(".")
    if len(parts) != 3 or parts[0] != "ml":
        return None
    family, size = parts[1], parts[2]
    if family in _GPU_FAMILIES:
        gpus = _MULTI_GPU_SIZES.get(size, 1)
        if family == "p3" and size in ("8xlarge", "16xlarge"):
            gpus = 4 if size == "8xlarge" else 8
        if family in ("p3dn", "p4d", "p4de", "p5", "p5e", "p5en"):
            gpus = 8
        return float(_GPU_FAMILIES[family]), gpus
    if family in _CPU_GIB and size in _VCPUS:
        return float(_CPU_GIB[family] * _VCPUS[size]), 0
    return None


def training_bytes(parameters: int, adapter: str) -> int:
    """Memory that fine-tuning needs for the weights, gradients and optimiser state (activations aside)."""
    if adapter == "lora":
        return int(parameters * 4 + parameters * LORA_TRAINED_SHARE * FULL_BYTES_PER_PARAMETER)
    return parameters * FULL_BYTES_PER_PARAMETER


def training_devices(instance_type: str | None, instance_count: int = 1) -> int:
    """How many training processes torchrun starts: one per GPU of each instance, one per CPU instance."""
    known = instance_memory(instance_type)
    return max(1, known[1] if known else 1) * max(1, instance_count)


def instance_for(parameters: int, adapter: str, default: str | None) -> str | None:
    """The training instance for a base when the spec names none: the stack's `default` when fine-tuning
    fits one of its devices (or its memory is unknown), else the smallest single-GPU instance that holds
    it, else the smallest multi-GPU instance whose GPUs hold it sharded (FSDP); `default` again when none
    does (`estimate_fit` then refuses, saying to choose a smaller base)."""
    needed = training_bytes(parameters, adapter) / 2**30
    known = instance_memory(default)
    if known is None or needed <= known[0] * USABLE_SHARE:
        return default
    one = next((name for name, gib in ONE_DEVICE_SUGGESTIONS if needed <= gib * USABLE_SHARE), None)
    return one or next((name for name in SHARDED_SUGGESTIONS if shards_fit(needed, name, 1)), default)


def shards_fit(needed_gib: float, instance_type: str, instance_count: int) -> bool:
    known = instance_memory(instance_type)
    devices = training_devices(instance_type, instance_count)
    return known is not None and devices > 1 and needed_gib / devices <= known[0] * USABLE_SHARE
