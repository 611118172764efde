"""Encoders: items -> preprocessing -> a runtime -> (N, D) float32 rows, and the measurements
made with them (:func:`~embedkit.tune`, :func:`~embedkit.quantization_report`).
"""
