"""Insight into trained models: why they decide (Grad-CAM) and what they know."""
