"""What an ImageId may be, for every reader and writer of one (prepare, the shard readers,
the prediction shards and postproc).

NOTE: a module of its own, with no imports but ``re``: postproc.predio (every postproc
command, their pool workers) checks keys with it, and ``dataio.geo``'s rasterio and GDAL cost
those ~0.3 s and ~20 MiB at start.
"""

from __future__ import annotations

import re

# NOTE: use it with fullmatch: with match, "$" also matched before a final newline, and a file
# named "RGB-PanSharpen_x\n.tif" gave the ImageId "x\n" (a broken CSV row downstream)
IMAGE_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
