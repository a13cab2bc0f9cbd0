"""Storage: what slimformer writes and reads on disk, below every other package but errors.

- :mod:`~slimformer.store.atomic`: single files written atomically.
- :mod:`~slimformer.store.outdir`: output folders that never lose the user's files (marker,
  lock, staged writing swapped in whole, scratch and resumable state).
- :mod:`~slimformer.store.integrity`: SHA-256 of files and sections, sealed manifests.
- :mod:`~slimformer.store.manifest`: the one artifact format (``slimformer.json``).
- :mod:`~slimformer.store.limits`: bounds on every file read from the user.
"""
