"""Evaluations of a pretrained encoder's features while it trains."""
