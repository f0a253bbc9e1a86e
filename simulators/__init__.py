"""Simulated cards, terminals, HIS feeds and citizens that drive the system through its public faces."""
