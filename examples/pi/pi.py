"""Estimate pi by throwing random darts at a square: one grid task per seed and sample size."""

import argparse
import random

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, required=True)
parser.add_argument("--n", type=int, required=True, help="number of darts")
args = parser.parse_args()

rng = random.Random(args.seed)
inside = sum(1 for _ in range(args.n) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
with open(f"result-{args.seed}-{args.n}.txt", "w") as out:
    out.write(f"{args.seed} {args.n} {inside} {4 * inside / args.n}\n")
