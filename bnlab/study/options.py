"""Where the runs of `bnlab study run` go: the executors and the resources of a cluster job.

Nothing here imports torch: the command line builds its flags from these before torch is loaded
(OMP_WAIT_POLICY must be set before then, bnlab.cli.commands).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bnlab.errors import UserError

EXECUTORS = {"local": "this machine's processes (default)",
             "slurm": "a SLURM job array through submitit",
             "node": "this machine through submitit, one (data-parallel) run at a time"}
CLUSTERS = ("slurm", "local")  # submitit's executors: a SLURM cluster, or this machine


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of one run; `time` in minutes, `mem_gb` in GB (0 = the partition's default)."""

    partition: str = ""
    gpus_per_run: int = 1
    cpus_per_gpu: int = 8
    time: int = 24 * 60
    mem_gb: int = 0
    parallel: int = 0  # runs at a time (SLURM's array throttle, %N); 0 = no limit
    account: str = ""
    extra: dict = field(default_factory=dict)  # further #SBATCH options, e.g. {"qos": "high"}

    def validate(self) -> SlurmOptions:
        for name in ("gpus_per_run", "cpus_per_gpu", "time"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got "
                                f"{getattr(self, name)}")
        for name in ("mem_gb", "parallel"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got "
                                f"{getattr(self, name)}")
        return self

    def parameters(self, cluster: str) -> dict:
        """submitit parameters (slurm_* names are passed only to the SLURM executor)."""
        g = self.gpus_per_run
        p: dict = {"timeout_min": self.time, "nodes": 1, "tasks_per_node": g,
                   "cpus_per_task": self.cpus_per_gpu}
        if cluster == "local":
            return p
        p["gpus_per_node"] = g
        if self.partition:
            p["slurm_partition"] = self.partition
        if self.mem_gb:
            p["mem_gb"] = self.mem_gb
        if self.parallel:
            p["slurm_array_parallelism"] = self.parallel
        if self.account:
            p["slurm_account"] = self.account
        if self.extra:
            p["slurm_additional_parameters"] = dict(self.extra)
        return p
