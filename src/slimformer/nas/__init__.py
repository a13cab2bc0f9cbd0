"""Multi-objective search over sub-networks and bit-widths: filled by the nas issue."""
