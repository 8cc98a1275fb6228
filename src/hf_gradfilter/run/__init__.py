"""Every stage in one command: ``hf-gradfilter run`` with per-stage skipping (`pipeline`), and the
report it writes from the run's files (`report`)."""
