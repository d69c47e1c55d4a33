"""Side-by-side benchmark of the ``mst`` backend against its peers (``python -m mst_compile.bench``)."""
