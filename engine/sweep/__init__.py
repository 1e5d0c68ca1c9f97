"""Sweeps as data: the YAML as a frozen ``SweepConfig`` (``config.py``), its grid as trials
(``trials.py``) and its results (``results.py``). ``engine.stages.sweep_stage`` runs one; the
Tune trial function is ``engine.distributed.tune.train_trial``."""
from engine.sweep.config import SweepConfig, load_sweep, parse_overrides, sweep_from_dict
from engine.sweep.trials import expand_trials, manifest_name, trial_key, trial_train_config

__all__ = ["SweepConfig", "expand_trials", "load_sweep", "manifest_name", "parse_overrides", "sweep_from_dict",
           "trial_key", "trial_train_config"]
