"""seedlm launch: CLI, configs, the DeepSpeed trainer, expert parallelism, checkpoints, export and push."""
