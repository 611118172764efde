"""Inputs: items and their per-item failures, the text and image policies, sources and regular files.
"""
