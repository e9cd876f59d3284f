"""Local zero-shot task definitions (lm-eval YAML) and the readers that feed them the shared data's files."""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
