"""Studies: a spec expanded into a grid of runs, run resumably, and their status.

spec.py       TOML or built-in name -> a Plan of validated run configs (--set, --only, --data-map)
runner.py     `run_study`: the study's folder, packs of GPU runs, an executor for the rest
executors.py  this machine's processes, or SLURM / this node through submitit
worker.py     `run_one`: one run under its lock (train, resume or skip; failures recorded)
progress.py   a progress bar with an ETA, or plain log lines
status.py     counts by status, one line per run, the list of built-in studies
"""
