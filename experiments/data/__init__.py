"""The experiments' data modules: ``cifar`` (CIFAR-10 images) and ``text`` (LM, translation, E2E)."""
