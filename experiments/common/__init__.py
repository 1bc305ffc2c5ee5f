"""Training infrastructure shared by the experiments.

* ``config``      – config validation (one clear line per bad field) and config records.
* ``sharding``    – the device mesh: batch sharded over the "data" axis, parameters
                    replicated. The one place that decides how arrays are laid out.
* ``train_state`` – ``TrainState``, the optimizer factory, the pure jitted train step.
* ``checkpoint``  – Orbax checkpoints: save every N steps, keep the last N, resume.
* ``loop``        – the epoch/step loop: progress bars, logging, evaluation hooks,
                    checkpoints, the non-finite policy, deterministic interruption.
* ``metrics``     – ``metrics.jsonl`` writer, ``summary.json``, library versions.
* ``memory``      – compiled memory analysis and device ``memory_stats()``.
* ``plots``       – PNG plots (matplotlib, Agg backend).
"""
