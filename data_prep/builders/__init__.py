"""One reader per real source dataset (its shipped layout) + the shared tfds builder.

`data_prep.registry` maps dataset names to them and holds `prepare`.
"""
