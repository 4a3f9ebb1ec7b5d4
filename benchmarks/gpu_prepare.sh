#!/usr/bin/env bash
# Here, before a GPU session: what benchmarks/gpu_session.py needs there, in the git-ignored .gpu/ folder.
#
#     benchmarks/gpu_prepare.sh [SOURCE_CSV]     # default ../shared/data/perov_5/val.csv
#
# - .gpu/data/perov_5_90_10/{train,val,test}.csv: SOURCE split 90/10 with seed 0 (issue 24). The 10 % is both
#   the validation split (the LR schedule and best.pt) and the sampled test split: the issue asks for two parts,
#   and the model needs a validation loss. Training selects best.pt by the denoising loss on those crystals,
#   never by their match rate.
# - .gpu/cache: the crystals of each split and the perov_5 preset's von Mises tables (EQUICSP_CACHE_DIR), so the
#   GPU machine, which has no pymatgen, parses nothing and computes no tables.
# - .gpu/refbench: the public code's harness (../shared does not travel), for benchmarks/gpu.py's side-by-side rows.
# The Ray + MLflow bundle (.gpu/bundle) is built by benchmarks/gpu_bundle.py.
# Carry: .gpu/data .gpu/cache .gpu/refbench (and .gpu/bundle for the ray part); benchmarks/gpu_session.py says how.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
source=${1:-../shared/data/perov_5/val.csv}
data=.gpu/data/perov_5_90_10
export EQUICSP_CACHE_DIR=.gpu/cache

# --fractions 0.9 0 0.1: 3,406 + 379 of Perov-5's 3,785 (0.9 0.1 0 would round the test part to 1 row).
"$python" -m equicsp.data split "$source" --out "$data" --fractions 0.9 0 0.1 --seed 0 --force
cp "$data/test.csv" "$data/val.csv"
"$python" - "$data" <<'EOF'
import sys

from equicsp.config import make_config
from equicsp.data.splits import load_splits
from equicsp.model.diffusion import Diffusion

config = make_config("perov_5", "equicsp", {"data.path": sys.argv[1]})
datasets = load_splits(config, ("train", "val", "test"))
Diffusion(config)  # computes and caches the preset's von Mises tables
Diffusion(make_config("mp_20", "equicsp", {"data.max_atoms": 20}))  # benchmarks/gpu.py's 6x512 rows
print(", ".join(f"{name}: {len(dataset)} crystals, {len(dataset.report.skipped)} unusable"
                for name, dataset in datasets.items()))
EOF
rm -rf .gpu/refbench
cp -r ../shared/refbench .gpu/refbench
rm -rf .gpu/refbench/__pycache__
du -sh .gpu/data .gpu/cache .gpu/refbench
