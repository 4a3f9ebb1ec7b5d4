"""The public code's matmul FLOPs in one training step, counted as benchmarks/gpu.py counts ours.

    python benchmarks/reference_work.py REFBENCH/ref_bench.py CASE BATCH   # prints {"case": .., "flops": ..}

Runs the harness (`../shared/refbench/ref_bench.py`) in this process under torch's FlopCounterMode,
for one untimed step on the CPU (the count does not depend on the device). Its own process, as the
harness must have: the public code's package is also called `equicsp`.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys

from torch.utils.flop_counter import FlopCounterMode


def main(argv: list[str]) -> None:
    script, case, batch_size = argv
    sys.argv = [script, "--device", "cpu", "--case", case, "--batch-size", batch_size, "--steps", "1",
                "--warmup", "0"]
    harness_output = io.StringIO()
    with FlopCounterMode(display=False) as counter, contextlib.redirect_stdout(harness_output):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit_:
            if exit_.code:
                raise SystemExit(f"{script} --case {case} exited with {exit_.code}") from None
    print(json.dumps({"case": case, "batch_size": int(batch_size), "flops": counter.get_total_flops()}))


if __name__ == "__main__":
    main(sys.argv[1:])
