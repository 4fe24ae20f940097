"""A DALI CPU pipeline that reads prepared shards as the loader's reader does, for the tests."""

from __future__ import annotations

from pathlib import Path


def dali_read(tars: list[Path], batch_size: int) -> tuple:
    """One batch of ``(img, mask, meta)`` TensorLists from ``tars`` (with their ``.idx``):
    ``img.npy`` decoded as numpy, ``mask.png`` as grey, ``meta.json`` as raw bytes."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def pipe():  # type: ignore[no-untyped-def]
        img, mask, meta = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["img.npy", "mask.png", "meta.json"], missing_component_behavior="error",
            dont_use_mmap=True)
        return fn.decoders.numpy(img), fn.decoders.image(mask, output_type=types.GRAY), meta

    p = pipe()
    p.build()
    return p.run()
