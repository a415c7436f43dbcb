"""Defenses against weight-poisoning backdoors.

Input-level defenses implement :class:`~peftguard.defenses.base.InputDefense`: they see the
texts before the victim does, may rewrite them, and may flag some as poisoned.
"""
