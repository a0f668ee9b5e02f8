"""Launcher of `medic_hf.scripts.poison` (also `medic-hf poison`).

It keeps `accelerate launch recipes/poison.py ...` and `python recipes/poison.py ...` working; see `--help`.
"""

from medic_hf.scripts.poison import main

if __name__ == "__main__":
    main()
