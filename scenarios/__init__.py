"""Multi-node system scenarios: real `dfs-peer join` processes, real mounts, a real LAN.

    python -m scenarios --list | NAME ... | all

`harness` runs one node process; `network` builds the LAN (a network namespace
per node on a bridge as root, else loopback); `cluster` starts nodes on it and
waits, with deadlines, for what a scenario expects; `trees` says what a mount
shows and how two differ; `report` prints each step with its timing; `catalog`
names the scenarios, one module each, whose docstrings say what they show.
"""
