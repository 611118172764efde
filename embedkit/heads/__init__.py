"""Heads: scikit-learn and FAISS heads on stored features, training and learning curves,
saved models and indexes, plots.
"""
