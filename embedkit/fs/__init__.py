"""Files and folders: atomic writes, writer locks, paths kept inside folders, output targets checked before work.

The lowest layer of embedkit: it imports nothing of embedkit but :mod:`embedkit.errors`.
"""
