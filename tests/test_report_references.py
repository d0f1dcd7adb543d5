"""Published reference numbers matched to arms (bnlab.report.references) by the images each
device trained on, with the shipped ImageNet file of Wu & He 2018, whose rows are per GPU."""

from __future__ import annotations

from pathlib import Path

from bnlab.report.arms import Arm
from bnlab.report.load import Run, Study, canon
from bnlab.report.references import arm_value, builtin_path, load_references, matches
from bnlab.report.tables import summary_table

REFS = load_references(builtin_path("imagenet"))
# Wu & He's Fig. 1: BN at 2 images per GPU on 8 GPUs, 34.7% error
BN_2_PER_GPU = next(r for r in REFS if "with BN at 2 images per GPU" in r.location)


def _arm(norm: str, batch: int, devices: int | None, sync_bn: bool = False,
         started: bool = True) -> Arm:
    """An arm of the imagenet study at global batch `batch`, its run data-parallel over
    `devices` processes as config.json records it (None: no record, as a packed run's)."""
    key = (("norm", canon(norm)), ("batch_size", canon(batch)))
    split = None if devices is None else {
        "world_size": devices, "backend": "nccl", "global_batch": batch,
        "per_device_batch": batch // devices, "sync_bn": sync_bn,
        "norm_batch": batch if sync_bn else batch // devices}
    config = {"norm": norm, "batch_size": batch, "sync_bn": sync_bn} if started else None
    runs = [Run(run_id=f"r{seed}", values={"norm": norm, "batch_size": batch, "seed": seed},
                dataset="imagenet", seed=seed, status="completed" if started else "missing",
                config=config, env=None, data=None, model=None,
                summary={"status": "completed", "test_acc": 0.6} if started else {},
                metrics=[], probes=[], arm=key, distributed=split if started else None)
            for seed in (0, 1)]
    return Arm("imagenet", key, runs, [])


def _published(arm: Arm) -> str:
    study = Study(Path("."), "imagenet", "", {}, {}, {}, {}, ["norm", "batch_size", "seed"],
                  {}, arm.runs)
    table = summary_table(study, [arm], 1, REFS)
    if "Published (%)" not in table.head:  # no entry matched the arm
        return "–"
    return table.rows[0][table.head.index("Published (%)")]


def _matches(arm: Arm) -> bool:
    return matches(BN_2_PER_GPU, arm.dataset, lambda k: arm_value(k, arm.value, arm.runs))


def test_a_global_batch_of_16_is_2_images_per_gpu_only_on_8_devices():
    assert BN_2_PER_GPU.value == 0.653
    eight, one = _arm("bn", 16, 8), _arm("bn", 16, 1)
    assert _matches(eight) and not _matches(one)
    assert _published(eight) == "65.30 [1]" and _published(one) == "–"
    # a run without a distributed record trained on one device: 16 images per step
    assert not _matches(_arm("bn", 16, None))
    # one device at a batch of 2 normalizes 2 images per step, as Wu & He's 8 GPUs did
    assert _matches(_arm("bn", 2, None)) and _matches(_arm("bn", 2, 1))
    # SyncBN normalizes over the global batch of 16, not each GPU's 2 images
    assert not _matches(_arm("bn", 16, 8, sync_bn=True))
    # not started: no record tells the devices, so no published number is put beside it
    assert not _matches(_arm("bn", 16, 8, started=False))


def test_an_arm_whose_runs_split_the_batch_differently_has_no_per_device_batch():
    arm = _arm("bn", 16, 8)
    arm.runs[1].distributed = dict(arm.runs[1].distributed, world_size=1, per_device_batch=16,
                                  norm_batch=16)
    assert arm_value("per_device_batch", arm.value, arm.runs) is None and not _matches(arm)
    # its first run not started yet: the others still tell
    arm = _arm("bn", 16, 8)
    arm.runs[0].config, arm.runs[0].distributed = None, None
    assert arm_value("per_device_batch", arm.value, arm.runs) == 2 and _matches(arm)
