"""Features: the feature store (namespaces, shards, commit records) and extraction into it,
locally or on Ray Data.
"""
