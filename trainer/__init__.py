"""The DeepSpeed GPT trainer: model, data, engine, loop, checkpoints, schedules."""
