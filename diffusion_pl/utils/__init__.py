"""Utilities every layer may use: errors, file I/O, paths, seeds, trust, checkpoints, the hub, Lightning internals.

    errors.py            the one user-error type and how commands print it
    fileio.py            atomic writes and hashes
    paths.py             the user cache folder
    seeding.py           the one seed mixer
    trust.py             which classes a saved config may import
    checkpoint.py        the one reader of the project's .ckpt and snapshot files (trust check, old class paths)
    hub.py               the Hugging Face hub: cache folder, offline mode, reachability
    lightning_compat.py  the places that rely on Lightning internals
"""
