"""The data sets and their device protocols (docs/data-protocol.md).

Recommender: `fetch_movielens_100k()` -> a directory; `load_interactions(dir)` -> `Interactions`;
`build_dataset(interactions, ProtocolConfig())` -> `DeviceDataset` (time-shift protocol `ts-v1`),
a synthetic drift generator, and the long-tail buckets (`activity_buckets(dataset)`: head / torso /
tail thirds of the device users by cloud-period activity). Images: `mntool.data.mnist`
(`fetch_mnist`, `load_mnist`) and `mntool.data.images` (`build_image_dataset(mnist,
ImageProtocolConfig())` -> `ImageDeviceDataset`, per-device protocol `img-v1`); not imported here, so
the recommender's imports stay as they were.
"""

from mntool.data.buckets import BUCKETS, activity_buckets, cloud_activity
from mntool.data.fetch import fetch_movielens_100k
from mntool.data.interactions import Interactions
from mntool.data.movielens import load_interactions
from mntool.data.protocol import PROTOCOL_VERSION, DeviceDataset, ProtocolConfig, RankingSet, SampleSet, build_dataset
from mntool.data.synthetic import SyntheticConfig, synthetic_interactions

__all__ = [
    "BUCKETS",
    "PROTOCOL_VERSION",
    "DeviceDataset",
    "Interactions",
    "ProtocolConfig",
    "RankingSet",
    "SampleSet",
    "SyntheticConfig",
    "activity_buckets",
    "build_dataset",
    "cloud_activity",
    "fetch_movielens_100k",
    "load_interactions",
    "synthetic_interactions",
]
