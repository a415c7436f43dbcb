"""Model-level audit: is a downloaded model backdoored, and by what trigger (``peftguard audit``)."""
