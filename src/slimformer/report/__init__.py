"""Reports: the run record, its summary and its JSON / Markdown / HTML renderers.

Storage (atomic writes, artifacts, output folders) is :mod:`slimformer.store`.
"""
