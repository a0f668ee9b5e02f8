"""The command-line programs, in the package (`medic-hf clone|poison|benchmark`, or `python -m medic_hf.scripts.X`).

Each has `make_parser()` and `main(argv)`; `recipes/*.py` are thin launchers so that
`accelerate launch recipes/clone.py ...` keeps working.
"""
