"""Feature building: event fields plus Redis entities, one pipelined round trip per micro-batch.

- ``builder``: FeatureBuilder, a batch's columns from its events and its Redis replies.
- ``columns``: one column builder per kind of feature; ``values``: column parsing.
- ``keys``: Redis key rendering; ``redis``: the Redis fetcher; ``replies``: requests, replies, pending replies.
"""

from streamserve.pipeline.features.builder import FeatureBuilder, Lookup, LookupObserver
from streamserve.pipeline.features.redis import HMGET_MANY, RedisFetcher, redis_fetcher
from streamserve.pipeline.features.replies import FeatureRequest, FetchFeatures, PendingReplies, Replies, StartFetch

__all__ = [
    "HMGET_MANY",
    "FeatureBuilder",
    "FeatureRequest",
    "FetchFeatures",
    "Lookup",
    "LookupObserver",
    "PendingReplies",
    "RedisFetcher",
    "Replies",
    "StartFetch",
    "redis_fetcher",
]
