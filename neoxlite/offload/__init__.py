"""Offloading: budgets, placement plans, the disk store and the block scheduler."""
