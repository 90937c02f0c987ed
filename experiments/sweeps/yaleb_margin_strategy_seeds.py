"""α × mining strategy over 3 seeds at the full schedule, on Extended Yale B
(experiments/yaleb.py): the re-run that is to replace the 200-step, one-seed tables.

3 margins × 6 strategies on squared distance × seeds 0, 1, 2 = 54 runs, each the Yale B
config's full 800 steps. `data.pairs.seed` is pinned to 0 so the seeds vary training only and
every seed is scored on the same test pairs. Measured here: one run 142 s wall (54 s CPU) on the
shared, loaded 2-core CPU, so about 2 h for the sweep at that load (about 25 min of CPU per
core with `--parallel 2` on an idle 2-core host); see docs/sweeps.md for the plan.

        python -m facenet_jax.sweep --sweep experiments/sweeps/yaleb_margin_strategy_seeds.py \
            --workdir runs/sweeps/yaleb_margin_strategy_seeds [--parallel N]

`base` is relative to this file.
"""

import pathlib
import runpy

# The same cells and seeds as the synthetic re-run, on another base config.
_SYNTHETIC = runpy.run_path(str(pathlib.Path(__file__).with_name(
    "default_margin_strategy_seeds.py")))
MARGINS, STRATEGIES, DISTANCES, SEEDS = (_SYNTHETIC[k] for k in ("MARGINS", "STRATEGIES",
                                                                 "DISTANCES", "SEEDS"))


def get_sweep() -> dict:
    return {**_SYNTHETIC["get_sweep"](), "name": "yaleb_margin_strategy_seeds",
            "base": "../yaleb.py"}
