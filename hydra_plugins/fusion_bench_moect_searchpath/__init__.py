"""Hydra search-path plugin: puts fusion_bench_moect's configs on ``fusion_bench``'s path.

Also appends FusionBench's own configs, so the CLI still finds ``fabric_model_fusion``
when the working directory has a ``config/`` folder (such as this repository's root),
which FusionBench would otherwise take as its only config directory.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class FusionBenchMoECTSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="fusion_bench_moect", path="pkg://fusion_bench_moect_config")
        search_path.append(provider="fusion_bench", path="pkg://fusion_bench_config")
