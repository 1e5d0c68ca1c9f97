"""One function per stage over a typed config: what a job calls once, and what a pipeline or a
sweep composes. A stage reads its inputs, does the work through the engine's packages and
writes its artifacts; the job around it parses flags into the config and prints the summary.

- ``score_stage(ScoreConfig) -> Path``: proxies, scores, scores.parquet (resumable; a Ray
  session is assumed).
- ``select_stage(SelectConfig) -> SelectResult``: a score table (and embeddings) -> a manifest.
- ``train_stage(TrainConfig) -> dict``: the (sub)set fitted on Ray Train, metrics.json
  (resumable; a Ray session is assumed); ``load_subset`` checks the manifest against the data.
- ``plan_sweep`` / ``sweep_stage(SweepConfig, out)`` (``sweep.py``): scores once, a manifest per
  (selector, fraction, seed), the Tune grid of retraining runs, the results and the report.
- ``pipeline_stage(PipelineConfig)`` (``pipeline.py``): the main job, the three stages composed.
"""
from engine.stages.select import SelectResult, select_stage

__all__ = ["SelectResult", "select_stage"]
