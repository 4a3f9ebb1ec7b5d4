"""Sweeps: Ray Tune + Optuna over training runs, a step_lr search per model, a final test evaluation, a report.

One sweep is a grid of cells (arm, seed), an arm being a row of the paper's Table 2 (an
objective preset, `config.ARMS`). Each cell gets `trials_per_cell` Tune trials; Optuna
(OptunaSearch, seeded, define-by-run) chooses the searched config fields of each trial, the
permutation-loss weight only for arms that have the loss. A trial is a Ray Train run
(`distributed.run_training`, a child MLflow run of the sweep's parent run), then an Optuna
search of the Langevin step size on validation crystals (sampling only: the model is not
retrained per step size). The best trial of each cell is evaluated on the test set
(`logged_evaluation`, on Ray through `ray_evaluation`), and the parent run receives the ablation table, a bar chart and the
learning curves.

Resume: the same sweep (name and storage path) started again restores the Tuner: finished
trials are kept, unfinished ones continue from their Ray Train checkpoint in the same MLflow
run, and evaluations already logged are read back instead of run again.

The modules, each importing only those above it:

    space.py      search-space domains and how Optuna draws from them
    spec.py       SweepSpec (what to sweep), SweepLaunch (where), validate_spec
    search.py     Optuna's define-by-run space, the seeded first points, the Tune searcher
    step_size.py  the step-size search of one trained model on validation crystals
    trials.py     one Tune trial: train, then search the step size
    cluster.py    the dataset on the cluster's nodes, GPUs, how many trials fit
    final.py      each cell's best trial, evaluated on the test split
    report.py     the ablation table, CSVs and figures logged to the parent run
    driver.py     run_sweep, which runs all of the above in order
"""

from equicsp.sweep.driver import SweepResult, run_sweep
from equicsp.sweep.final import CellResult
from equicsp.sweep.report import ablation_table, table_markdown
from equicsp.sweep.search import SearchSpace, initial_points
from equicsp.sweep.space import Choice, Domain, FloatRange, IntRange
from equicsp.sweep.spec import SweepError, SweepLaunch, SweepSpec, validate_spec
from equicsp.sweep.step_size import STEP_LR_METRIC

__all__ = ["STEP_LR_METRIC", "CellResult", "Choice", "Domain", "FloatRange", "IntRange", "SearchSpace", "SweepError",
           "SweepLaunch", "SweepResult", "SweepSpec", "ablation_table", "initial_points", "run_sweep", "table_markdown",
           "validate_spec"]
