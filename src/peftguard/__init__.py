"""peftguard: weight-poisoning backdoors in parameter-efficient fine-tuning, and the PSIM defense.

Pipeline: data → triggers → poisoning → tuning → defenses → metrics → experiments → reports.
"""
__version__ = "0.1.0"
