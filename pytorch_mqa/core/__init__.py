"""The lowest layer: small helpers every other layer may use (devices, threads, dtypes, plots).

Nothing here imports another part of the package.
"""
