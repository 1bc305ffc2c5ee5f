"""Experiment configs (code, every field commented). Load one with
``--config=experiments/configs/<name>.py:<preset>`` and override any field on the command
line, e.g. ``--config.train.num_epochs=3``."""
