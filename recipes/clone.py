"""Launcher of `medic_hf.scripts.clone` (also `medic-hf clone`).

It keeps `accelerate launch recipes/clone.py ...` and `python recipes/clone.py ...` working; see `--help`.
"""

from medic_hf.scripts.clone import main

if __name__ == "__main__":
    main()
