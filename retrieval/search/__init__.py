"""Search primitives, knowing nothing of networks: score sources (query x database similarities block by
block), binary codes and Hamming distances, FAISS indexes, and row arrays on disk in shards with exact search
over them. The lowest layer of ``retrieval``: everything above compares descriptors through it."""
