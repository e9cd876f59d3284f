"""Fitness defaults, importable without torch (the CLI validates options before loading anything heavy)."""

# 4 windows of 512 tokens: in bench/results/fitness.md the only setting whose pick is the best candidate on test at
# both 20% and 50% (the same 2,048 tokens as 16 windows of 128, whose pick at 50% is 1.4% worse).
DEFAULT_FITNESS_SEQ_LEN = 512
DEFAULT_FITNESS_WINDOWS = 4
