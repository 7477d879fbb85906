"""The cloud side of mntool and its CLI: data (`data`), device backbones (`models`), MetaNetwork
(`meta`), training and evaluation (`train`, `metrics`), parameter generation (`generate`),
patch building (`patches`), the service (`serve`) and the end-to-end demo (`demo`)."""
