"""Give a sink an fsspec filesystem you built yourself, and look at the stats a sink keeps.

Here the filesystem is fsspec's in-memory one; an s3fs.S3FileSystem, gcsfs.GCSFileSystem or
adlfs.AzureBlobFileSystem works the same way.
"""

from __future__ import annotations

import fsspec

import cio_sync

fs = fsspec.filesystem("memory")
sink = cio_sync.AdvancedSink("example-bucket/raw", filesystem=fs, format="json", flush_interval=None, max_rows=2)
for i in range(5):
    sink.write({"type": "track", "userId": str(i), "event": "Signed Up"})
print(sink)
print(sink.stats)  # two files were already published early (max_rows=2), one call is buffered
sink.close()
names = sorted(p.rsplit("/", 1)[-1] for p in fs.find("example-bucket/raw") if "/_" not in p)
print(names)
assert names == ["1.2.1.track.json", "1.2.2.track.json", "1.2.3.track.json"]
