"""Modules that run INSIDE the rknn-toolkit2 venv (its own python, numpy<=1.26): standard library, numpy, rknn and
exo_rknpu.rknn.io only. Started as subprocesses by rknn/compile.py (worker JOB.json) and rknn/sim.py (worker --serve)."""
