"""Hydra search-path plugin: puts fusion_bench_moect's configs on ``fusion_bench``'s path.

Also appends FusionBench's own configs, so the CLI still finds ``fabric_model_fusion``
when the working directory has a ``config/`` folder (such as this repository's root),
which FusionBench would otherwise take as its only config directory.
"""

from importlib.util import find_spec
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def config_dir() -> Path | None:
    """The YAML configs: inside the installed wheel, or ./config of an editable checkout."""
    spec = find_spec("fusion_bench_moect")
    if spec is None or spec.origin is None:
        return None
    package = Path(spec.origin).parent
    for candidate in (package / "yaml_config", package.parent / "config"):
        if (candidate / "method" / "moe_ct_upcycling.yaml").is_file():
            return candidate
    return None


class FusionBenchMoECTSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        directory = config_dir()
        if directory is not None:
            search_path.append(provider="fusion_bench_moect", path=f"file://{directory}")
        search_path.append(provider="fusion_bench", path="pkg://fusion_bench_config")
