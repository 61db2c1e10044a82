"""Qwen evaluation harness: tasks, runner, scoring. See README.md and EVALUATION.md."""
