"""Launcher of `medic_hf.scripts.benchmark` (also `medic-hf benchmark`).

It keeps `accelerate launch recipes/benchmark.py ...` and `python recipes/benchmark.py ...` working; see `--help`.
"""

from medic_hf.scripts.benchmark import main

if __name__ == "__main__":
    main()
