"""Reports: the run record, its JSON / Markdown / HTML renderers, atomic file writing."""
