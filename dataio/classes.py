"""The mask's class ids, in a module with no imports: readers (the manifest, loaders) need them
without loading rasterio and shapely, which only labelling uses."""

BACKGROUND, BUILDING, BOUNDARY = 0, 1, 2
NUM_CLASSES = 3
# their names, by id: the manifest's "classes", prob.png's channels, the per-class val IoU keys,
# the ONNX export's metadata
CLASS_NAMES = ("background", "building", "boundary")
