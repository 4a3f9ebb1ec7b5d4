"""The paper's ablation study (Table 2), trained, tuned and evaluated: every arm x seeds.

    python sweeps/ablation.py --profile smoke          # the bundled sample, whole pipeline in minutes on a CPU
    python sweeps/ablation.py --profile smoke --task generation   # the same arms, ab initio generation
    python sweeps/ablation.py --profile paper --preset mp_20     # after `python -m equicsp.data fetch mp_20`
    ray submit cluster/gpu.yaml sweeps/ablation.py -- --profile paper --preset mp_20 --data /shared/mp_20

Each arm's permutation-loss weight is searched by Optuna where the arm has the loss, each
trained model's Langevin step size on validation crystals, and each (arm, seed)'s best model
is evaluated on the test split. Running the same command again resumes an interrupted sweep.
With --task generation every arm generates crystals instead (docs/method.md#generation): no
step-size search, each cell's best model (lowest validation loss) generates --num-generated
crystals, and the table shows validity, coverage and Wasserstein distances.
"""

import argparse
from dataclasses import replace

from equicsp.cli.options import HelpFormatter, examples
from equicsp.cli.sweep import add_launch_arguments, apply_arguments, launch_from_arguments, run_from_command_line
from equicsp.config import ARMS
from equicsp.data.fetch import DATASETS, fetch_hint, fetched_data
from equicsp.sweep.space import FloatRange
from equicsp.sweep.spec import SweepSpec

PROFILES = {
    # The bundled Perov-5 sample on 2 CPU cores: short training of the small smoke model.
    "smoke": SweepSpec(
        name="ablation-smoke", preset="smoke", seeds=(0,), trials_per_cell=1,
        overrides={"optim.epochs": 40, "run.checkpoint_every": 20, "sampler.batch_size": 25},
        step_lr=FloatRange(3e-5, 3e-3, log=True), step_lr_trials=3, step_lr_crystals=25, test_samples=1,
        num_generated=100),
    # The paper's training settings (the dataset preset's model size and epochs), three seeds, and the reference
    # codes' sampler: no clamp of the implied clean lattice or types (README, How it follows the paper).
    "paper": SweepSpec(
        name="ablation-paper", preset="mp_20", seeds=(0, 1, 2), trials_per_cell=4,
        overrides={"sampler.clip_lattice": False, "sampler.clip_types": False},
        step_lr=FloatRange(1e-7, 1e-4, log=True), step_lr_trials=12, step_lr_crystals=256, test_samples=1,
        num_generated=10000),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sweeps/ablation.py", description=__doc__.splitlines()[0], formatter_class=HelpFormatter,
        epilog=examples("python sweeps/ablation.py --profile smoke",
                        "python sweeps/ablation.py --profile smoke --arms equicsp diffcsp --task generation",
                        "python sweeps/ablation.py --profile paper --preset mp_20 --data data/mp_20"))
    parser.add_argument("--profile", choices=sorted(PROFILES), default="smoke",
                        help="smoke: the bundled sample on a CPU | paper: a real dataset, three seeds")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help=f"the Table 2 rows to run, from {list(ARMS)}")
    add_launch_arguments(parser)
    args = parser.parse_args(argv)
    spec = apply_arguments(PROFILES[args.profile], args)
    if args.profile == "paper" and not args.data and fetched_data(spec.preset) is None:
        fetch = f"{fetch_hint(spec.preset)}, or " if spec.preset in DATASETS else ""
        parser.error(f"--profile paper trains on a real dataset: {fetch}give --data PATH (a folder with train/val/test)")
    run_from_command_line(replace(spec, arms=tuple(args.arms)), launch_from_arguments(args))


if __name__ == "__main__":
    main()
