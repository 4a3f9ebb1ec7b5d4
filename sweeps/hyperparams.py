"""A general hyperparameter sweep of one arm: learning rate, batch size, model size, sigma range, timesteps.

    python sweeps/hyperparams.py --arms equicsp --profile smoke
    ray submit cluster/gpu.yaml sweeps/hyperparams.py -- --arms equicsp --profile paper --preset mp_20 --data /shared/mp_20

The same machinery as the ablation sweep (equicsp.sweep): Optuna picks each trial's values,
every trained model gets its step size searched on validation crystals, the best model
per seed is evaluated on the test split, and everything lands in one MLflow parent run.
`--task generation` tunes a generation model instead (no step-size search; see sweeps/ablation.py).
"""

import argparse
from dataclasses import replace

from equicsp.cli.options import HelpFormatter, deprecated, examples
from equicsp.cli.sweep import add_launch_arguments, apply_arguments, launch_from_arguments, run_from_command_line
from equicsp.config import ARMS
from equicsp.sweep.space import Choice, FloatRange, IntRange
from equicsp.sweep.spec import SweepSpec

SPACE = {
    "optim.lr": FloatRange(1e-4, 3e-3, log=True),
    "optim.batch_size": Choice((64, 128, 256)),
    "model.hidden_dim": Choice((128, 256, 512)),
    "model.num_layers": IntRange(3, 6),
    "diffusion.sigma_begin": FloatRange(1e-3, 1e-2, log=True),
    "diffusion.sigma_end": FloatRange(0.3, 1.0),
    "diffusion.timesteps": Choice((500, 1000)),
}

PROFILES = {
    "smoke": SweepSpec(
        name="hyperparams-smoke", preset="smoke", seeds=(0,), trials_per_cell=4,
        space={"optim.lr": FloatRange(3e-4, 3e-3, log=True), "model.hidden_dim": Choice((64, 128)),
               "diffusion.sigma_end": FloatRange(0.3, 1.0)},
        overrides={"optim.epochs": 30, "run.checkpoint_every": 15, "sampler.batch_size": 25},
        step_lr=FloatRange(3e-5, 3e-3, log=True), step_lr_trials=3, step_lr_crystals=25, num_generated=100),
    "paper": SweepSpec(
        name="hyperparams-paper", preset="mp_20", seeds=(0,), trials_per_cell=24, space=SPACE, asha=True,
        step_lr=FloatRange(1e-7, 1e-4, log=True), step_lr_trials=12, step_lr_crystals=256, num_generated=10000),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sweeps/hyperparams.py", description=__doc__.splitlines()[0], formatter_class=HelpFormatter,
        epilog=examples("python sweeps/hyperparams.py --profile smoke",
                        "python sweeps/hyperparams.py --arms equicsp diffcsp --profile smoke --trials 8",
                        "python sweeps/hyperparams.py --profile paper --preset mp_20 --data data/mp_20"))
    parser.add_argument("--profile", choices=sorted(PROFILES), default="smoke",
                        help="smoke: the bundled sample on a CPU | paper: a real dataset")
    parser.add_argument("--arms", nargs="+", default=["equicsp"],
                        help=f"the objective presets to tune, each on its own, from {list(ARMS)}")
    parser.add_argument("--arm", dest="arms", nargs=1, action=deprecated("--arms"), help=argparse.SUPPRESS)
    add_launch_arguments(parser)
    args = parser.parse_args(argv)
    if args.profile == "paper" and not args.data:
        parser.error("--profile paper trains on a real dataset: give --data PATH (a folder with train/val/test)")
    spec = replace(apply_arguments(PROFILES[args.profile], args), arms=tuple(args.arms))
    run_from_command_line(replace(spec, name=args.name or f"{spec.name}-{'-'.join(args.arms)}"),
                          launch_from_arguments(args))


if __name__ == "__main__":
    main()
