"""Jobs: what the commands do (train, evaluate, predict, report, ablate, sweep, demo, ...)."""
