"""The data sets and their device protocols (docs/data-protocol.md).

Recommender: `fetch_movielens_100k()` -> a directory; `load_interactions(dir)` -> `Interactions`;
`build_dataset(interactions, ProtocolConfig())` -> `DeviceDataset` (time-shift protocol `ts-v1`),
and a synthetic drift generator. Images: `mntool.data.mnist` (`fetch_mnist`, `load_mnist`) and
`mntool.data.images` (`build_image_dataset(mnist, ImageProtocolConfig())` -> `ImageDeviceDataset`,
per-device protocol `img-v1`); not imported here, so the recommender's imports stay as they were.
"""

from mntool.data.fetch import fetch_movielens_100k
from mntool.data.interactions import Interactions
from mntool.data.movielens import load_interactions
from mntool.data.protocol import PROTOCOL_VERSION, DeviceDataset, ProtocolConfig, RankingSet, SampleSet, build_dataset
from mntool.data.synthetic import SyntheticConfig, synthetic_interactions

__all__ = [
    "PROTOCOL_VERSION",
    "DeviceDataset",
    "Interactions",
    "ProtocolConfig",
    "RankingSet",
    "SampleSet",
    "SyntheticConfig",
    "build_dataset",
    "fetch_movielens_100k",
    "load_interactions",
    "synthetic_interactions",
]
