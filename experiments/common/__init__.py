"""Training infrastructure shared by the experiments (see docs/architecture.md).

* ``trainer``     – the one driver: ``Task`` (what an experiment supplies), validation of
                    the shared config sections, per-model train/resume/evaluate/report,
                    summary, side-by-side table, curves plot.
* ``config``      – config validation (one clear line per bad field) and config records.
* ``sharding``    – the (data, fsdp) device mesh: batch sharded over every device,
                    parameters replicated or FSDP-sharded; jax.distributed set-up,
                    per-host batch rows, process-0-only writes. The one place that
                    decides how arrays are laid out.
* ``train_state`` – the optimizer factory, the ahead-of-time compile of the library's train
                    step (``bdia_jax.training``) and the state fingerprint.
* ``checkpoint``  – Orbax checkpoints: save every N steps (atomically), keep the last N,
                    resume from the newest one that verifies (fingerprint), skip and
                    report corrupted ones.
* ``loop``        – the epoch/step loop: progress bars, logging, evaluation hooks,
                    checkpoints, the non-finite/overflow policy, deterministic interruption.
* ``metrics``     – ``metrics.jsonl`` writer, ``summary.json``, library versions.
* ``memory``      – the one peak-memory figure (compiled memory analysis) and device
                    ``memory_stats()``.
* ``plots``       – every PNG plot (matplotlib figures, no pyplot).
* ``data_checks`` – TFDS dataset-name and data-dir checks.
* ``runs``        – the command line of ``python -m experiments.<name>`` and the
                    ``config.json`` resume check.
"""
