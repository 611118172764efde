"""The HTTP service: the FastAPI app (thin routes), request logic, dynamic batching, metrics.
"""
