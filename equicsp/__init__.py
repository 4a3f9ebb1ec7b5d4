"""EquiCSP: an equivariant diffusion model for crystal structure prediction."""

import os

# torch's OpenMP runtime (libgomp) reads OMP_WAIT_POLICY once, when torch loads it. Its default has idle threads
# spin, which on a busy machine takes the cores from the threads doing work (generate ran 35x slower beside a test
# suite); passive waiting costs 26-41 % of the steps/s on an idle one (docs/performance.md), which
# OMP_WAIT_POLICY=ACTIVE takes back on a dedicated machine. Every command and every Ray
# worker that unpickles our functions imports this package before torch, so it is set here; a user's choice stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
