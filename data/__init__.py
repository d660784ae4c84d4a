"""Data: manifests, the revisitop layout, robust image loading, datasets and transforms.

Import the submodules (``data.manifest``, ``data.revisitop``, ``data.images``, ``data.datasets``,
``data.transforms``, ``data.roots``); this package file stays empty so that light tools (the data
preparation scripts) do not pay for importing torch.
"""
