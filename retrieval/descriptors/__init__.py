"""Descriptors: the method interface and its registry (a method encodes images and says how its descriptors
compare, through :mod:`retrieval.search`), batched extraction into memory or shards, and trained networks as
methods (``run:RUN_DIR``, ``model:FILE``, ``itq@``/``pca@`` projections of them)."""
