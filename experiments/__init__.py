"""Training studies: each script trains a set of named variants (stored and reused under
``--out``), evaluates them and writes its result tables to ``docs/results/``. Run from the
repository root as ``python -m experiments.<script> --help``; they share the run / store /
report loop of the top-level ``harness`` package."""
