"""Experiments built on bdia_jax: entry points (``python -m experiments.<name>``), their
configs (``experiments/configs``) and the shared training infrastructure
(``experiments/common``)."""
