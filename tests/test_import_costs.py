"""What a run of bnlab's own networks loads: not torchvision (a second or more on a 2-core CPU,
in every worker process), and the study runner not the report's plotting and statistics stack
(matplotlib, scipy) before it needs it. One subprocess checks it all in order (each new
process costs seconds of imports)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys

def loaded():
    return [m for m in ("torchvision", "matplotlib", "scipy") if m in sys.modules]

import bnlab.api as a
a.Study, a.study_status
assert loaded() == [], ("the study API", loaded())

# a ResNet-20 run with probes, and one with Fixup's init, through the runner's worker
from bnlab.config import RunConfig
from bnlab.study.worker import run_one
for init in ("kaiming", "fixup"):
    cfg = RunConfig(dataset="synthetic", model="resnet20", norm="bn" if init == "kaiming"
                    else "none", init=init, limit_train=32, limit_test=32, epochs=1,
                    batch_size=32, probe_every=1, probe_images=32, device="cpu")
    s = run_one(cfg, sys.argv[1], log=lambda line: None)
    assert s["status"] in ("completed", "no_learning"), s
assert loaded() == [], ("a probed run", loaded())

from bnlab.report import write_report
assert "matplotlib" in loaded()

# torchvision's blocks, found lazily, are found once torchvision built a model
from bnlab.models import build_model
from bnlab.models.names import torchvision_blocks
assert torchvision_blocks() == ()
m = build_model("resnet18", 10, norm="none", init="fixup")
assert len(torchvision_blocks()) == 2 and "torchvision" in loaded()
assert not any(isinstance(b, torchvision_blocks()) for b in m.modules())  # all FixupBlocks
print("ok")
"""


def test_what_a_run_a_report_and_a_torchvision_model_load(tmp_path):
    done = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
