"""Fitness defaults, importable without torch (the CLI validates options before loading anything heavy)."""

# 16 windows of 128 tokens: in bench/results/fitness.md, over random draws of which validation windows a fitness
# uses, its pick has less regret at 20% and 50% than that of 4 windows of 512 (the same 2,048 tokens, slower here),
# whose pick of the 50% best came with the first four windows and 6% of the draws.
DEFAULT_FITNESS_SEQ_LEN = 128
DEFAULT_FITNESS_WINDOWS = 16
