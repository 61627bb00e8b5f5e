"""A `vivit-train` run, split by what it does: the arguments' defaults and checks (arguments.py),
the data (datasets.py), where the run starts (start.py: --resume or --pretrained), the optimiser
and schedule (optim.py), the loss (losses.py), metrics and logging (metrics.py), held-out scoring
(evaluation.py, also used by `vivit-eval` and `vivit-predict`), stop signals (stopping.py) and the loop
(trainer.py)."""
