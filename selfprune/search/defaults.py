"""Fitness defaults, importable without torch (the CLI validates options before loading anything heavy)."""

# 4 windows of 512 tokens: in bench/results/fitness.md the same 2,048 tokens as 16 windows of 128 pick a candidate
# within 0.53 test perplexity of the best at 20% and 50% (16 x 128 misses it by 8.25 at 20%).
DEFAULT_FITNESS_SEQ_LEN = 512
DEFAULT_FITNESS_WINDOWS = 4
