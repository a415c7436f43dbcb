"""Further attacks: a module here that calls :func:`peftguard.triggers.register_attack` adds an
attack to the CLI, the configs and the reports; the paper's three live in ``triggers.py``."""
