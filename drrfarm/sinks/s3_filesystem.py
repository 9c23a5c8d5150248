"""The s3fs filesystem drrfarm opens for ``s3://`` URLs configured from the AWS environment.

A subclass only so that its bounded retry count is part of the class: fsspec filesystems are pickled as
(class, constructor arguments), so an attribute set on an instance would be lost in every Ray worker and
forked DataLoader worker that receives the filesystem. Imported lazily (s3fs pulls in aiobotocore).
"""

from __future__ import annotations

import s3fs


class BoundedRetryS3FileSystem(s3fs.S3FileSystem):
    """``s3fs.S3FileSystem`` retrying its own retryable errors twice (s3fs's default: 5), under the bounded
    backoff of :class:`drrfarm.sinks.store.Store`."""

    retries = 2
