"""Studies: a spec expanded into a grid of runs, run resumably, and their status.

spec.py       TOML or built-in name -> a Spec, checked; the flags --set, --only, --data-map
expand.py     a Spec -> a Plan of validated run configs (grid, cases, flags, [tune] groups)
preflight.py  a Plan's names checked against the registries just before it runs
tuning.py     the [tune] protocol: groups, their tuning runs, the choice of a value
runner.py     `run_study`: the study's folder, packs of GPU runs, an executor for the rest
executors.py  this machine's processes, or SLURM / this node through submitit
worker.py     `run_one`: one run under its lock (train, resume or skip; failures recorded)
progress.py   a progress bar with an ETA, or plain log lines
status.py     counts by status, one line per run, the list of built-in studies
estimate.py   a study's time from measured throughput
options.py    the executors' option table (torch-free, for --help)
"""
