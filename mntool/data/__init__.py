"""MovieLens-100k fetch and readers, the time-shift protocol, and a synthetic drift generator.

`fetch_movielens_100k()` -> a directory; `load_interactions(dir)` -> `Interactions`;
`build_dataset(interactions, ProtocolConfig())` -> `DeviceDataset` (docs/data-protocol.md).
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
