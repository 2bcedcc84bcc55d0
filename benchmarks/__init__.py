"""Side-by-side measurements; each module runs as a script (``python benchmarks/<name>.py``) and writes
``benchmarks/results/``. Installed as a package so that tests can check a benchmark's reference
implementations (``benchmarks.fast_samplers.dpm_solver_pp_3m``) without path edits."""
