"""Training infrastructure shared by the experiments.

* ``config``      – config validation (one clear line per bad field) and config records.
* ``sharding``    – the (data, fsdp) device mesh: batch sharded over every device,
                    parameters replicated or FSDP-sharded; jax.distributed set-up,
                    per-host batch rows, process-0-only writes. The one place that
                    decides how arrays are laid out.
* ``train_state`` – ``TrainState``, the optimizer factory, the pure jitted train step.
* ``checkpoint``  – Orbax checkpoints: save every N steps (atomically), keep the last N,
                    resume from the newest one that verifies (fingerprint), skip and
                    report corrupted ones.
* ``loop``        – the epoch/step loop: progress bars, logging, evaluation hooks,
                    checkpoints, the non-finite/overflow policy, deterministic interruption.
* ``metrics``     – ``metrics.jsonl`` writer, ``summary.json``, library versions.
* ``memory``      – compiled memory analysis and device ``memory_stats()``.
* ``plots``       – PNG plots (matplotlib, Agg backend).
* ``host_devices`` – one worker process per host-device count (the multi-device benchmarks).
* ``runs``        – per-run helpers: the models a mode trains, the resume-config check,
                    the summary's memory record, side-by-side tables.
"""
